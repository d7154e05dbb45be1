"""The command line: format table, plots, pixel picture, and clear errors on bad data."""

import gzip
import subprocess
import sys

import numpy as np
import pytest

from fourbit import formats
from fourbit.cli import format_rows, main
from fourbit.tasks.idx import DataError, read_idx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_formats_table_lists_every_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in formats.names():
        assert f"\n{name} " in out
    rows = {r["name"]: r for r in format_rows()}
    assert rows["fp4_radix4"]["values"] == 15 and rows["fp4_radix4"]["binades"] == 12.0
    assert rows["int4"]["max"] == 7 and rows["fp8_e4m3"]["max"] == 448
    assert rows["mxfp4"]["bits"] == "4.25" and rows["nvfp4"]["bits"] == "4.5"


def test_formats_plot_writes_a_png_and_no_temp_file(tmp_path):
    out = tmp_path / "sub" / "grids.png"
    assert main(["formats", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["grids.png"]


def test_pixels_picture_from_the_debian_package(tmp_path):
    out = tmp_path / "pixels.png"
    assert main(["pixels", "--out", str(out), "--count", "2"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def _write_idx(path, array, magic_type=0x08):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_read_idx_round_trip_and_user_data_dir(tmp_path, capsys):
    images = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9], dtype=np.uint8))
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    assert main(["pixels", "--data-dir", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0


def test_bad_data_gives_one_clear_line(tmp_path, capsys):
    assert main(["pixels", "--data-dir", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 9])))  # header cut short
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(bad)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(bad)
    assert not (tmp_path / "p.png").exists()


def test_bad_argument_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["pixels", "--index", "-1", "--out", str(tmp_path / "p.png")]) == 2
    assert "--index" in capsys.readouterr().err


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "fourbit", "formats"], capture_output=True, text=True)
    assert done.returncode == 0 and "fp4_radix4" in done.stdout

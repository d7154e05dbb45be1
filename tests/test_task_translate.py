"""The translation task: diatheke parsing, pairing, caching, BPE, the quantizable Transformer."""

import shutil
import subprocess

import pytest
import sacrebleu
import torch
from torch import nn

from fourbit import recipes, tasks
from fourbit.convert import convert
from fourbit.nn import QLinear, QMatmul
from fourbit.tasks.bpe import BPE, EOS, UNK
from fourbit.tasks.idx import DataError
from fourbit.tasks.translate import (
    INSTALL_HINT,
    SOURCE_MODULE,
    TARGET_MODULE,
    TranslateTransformer,
    TranslationPairs,
    clean_verse,
    pair_verses,
    parse_plain,
    split_pairs,
)

# Hand-written dumps in the on-disk format of `diatheke -b MODULE -f plain -k RANGE`
# (copied from its real output): poetry runs over several lines; from the first psalm
# title on, WEB prints the title (repeated, even in later books) on the line before
# each verse and indents the verse line; markup can leak into a verse line; the WEB
# ends with its glossary and both end with the module tag.
WEB = (
    "Genesis 1:1: In the beginning, God created the heavens and the earth.\n"
    "Genesis 1:2: The earth was formless and empty. \n"
    "Psalms 2:11: Serve Yahweh with fear,\n"
    "and rejoice with trembling. \n"
    "\n"
    "\n"
    "A Psalm by David, when he fled from Absalom his son.\n"
    "  Psalms 3:1: Yahweh, how my adversaries have increased!\n"
    "Many are those who rise up against me. \n"
    "\n"
    "A Psalm by David, when he fled from Absalom his son.\n"
    "  Psalms 3:2: Many there are who say of my soul,\n"
    "“There is no help for him in God.”\n"
    "Selah.\n"
    "\n"
    "A Psalm by David, when he fled from Absalom his son.\n"
    "  Tobit 6:17: The demon will smell it, and flee away.\n"
    '<title canonical="true" type="psalm">A praise psalm by David.</title> <lg sID="gen13352"/> '
    '<l level="1" sID="gen13353"/>Tobit 6:18: \n'
    "A praise psalm by David.\n"
    '  Acts 1:1: The first book I wrote, <note type="x">Or, “account”</note>Theophilus.\n'
    "A praise psalm by David.\n"
    "  Revelation of John 22:21: The grace of the Lord Jesus Christ be with all the saints. Amen.     \n"
    "\n"
    "\n"
    "\n"
    "   The following words used in the World English Bible (WEB) are not very common.  Abba Abba "
    "is a Chaldee word for father. Zion Zion is a name of Jerusalem.  \n"
    "(engWEB2015eb)\n"
)
RV = (
    "Genesis 1:1: EN el principio crió Dios los cielos y la tierra.\n"
    "Genesis 1:2: Y la tierra estaba desordenada y vacía <H8414>, y las tinieblas estaban sobre "
    "la haz del abismo.\n"
    "Psalms 2:11: Servid á Jehová con temor, Y alegraos con temblor.\n"
    "Psalms 3:1: Salmo de David. ¡OH Jehová, cuánto se han multiplicado mis enemigos!\n"
    "Psalms 3:2: Muchos dicen de mi vida: No hay para él salud en Dios. (Selah.)\n"
    "Acts 1:1: EN el primer tratado, oh Teófilo, he hablado de todas las cosas.\n"
    "Acts 8:37: Y Felipe dijo: Si crees de todo corazón, bien puedes.\n"
    "Revelation of John 22:21: La gracia de nuestro Señor Jesucristo sea con todos vosotros. Amén.\n"
    "(spaRV1909eb)\n"
)


def test_parser_reads_the_real_format():
    web = parse_plain(WEB, "web")
    assert list(web) == [
        "Genesis 1:1", "Genesis 1:2", "Psalms 2:11", "Psalms 3:1", "Psalms 3:2",
        "Tobit 6:17", "Acts 1:1", "Revelation of John 22:21",
    ]  # fmt: skip
    # multi-line verses are joined; the psalm title before the next verse is not verse text
    assert web["Psalms 2:11"] == "Serve Yahweh with fear, and rejoice with trembling."
    assert (
        web["Psalms 3:1"]
        == "Yahweh, how my adversaries have increased! Many are those who rise up against me."
    )
    assert web["Psalms 3:2"] == "Many there are who say of my soul, “There is no help for him in God.” Selah."
    assert web["Tobit 6:17"] == "The demon will smell it, and flee away."  # the leaked markup line too
    assert web["Acts 1:1"] == "The first book I wrote, Theophilus."  # footnote dropped
    # the glossary appendix and the module tag are not part of the last verse
    assert (
        web["Revelation of John 22:21"] == "The grace of the Lord Jesus Christ be with all the saints. Amen."
    )

    rv = parse_plain(RV, "rv")
    assert rv["Genesis 1:1"] == "En el principio crió Dios los cielos y la tierra."  # drop cap
    assert rv["Genesis 1:2"].startswith("Y la tierra estaba desordenada y vacía, y las")  # Strong's number
    assert rv["Psalms 3:1"] == "Salmo de David. ¡Oh Jehová, cuánto se han multiplicado mis enemigos!"
    assert all("<" not in t and "  " not in t for t in (*web.values(), *rv.values()))

    pairs = pair_verses(web, rv)  # Tobit (WEB only) and Acts 8:37 (RV only) are dropped
    assert [ref for ref, _, _ in pairs] == [
        "Genesis 1:1", "Genesis 1:2", "Psalms 2:11", "Psalms 3:1", "Psalms 3:2", "Acts 1:1",
        "Revelation of John 22:21",
    ]  # fmt: skip
    splits = split_pairs(pairs, test_books=("Psalms",))
    assert [r for r, _, _ in splits["test"]] == ["Psalms 2:11", "Psalms 3:1", "Psalms 3:2"]
    assert not {r for r, _, _ in splits["train"]} & {r for r, _, _ in splits["test"]}


def test_clean_verse_strips_markup():
    assert clean_verse('a <w lemma="x">b</w>  c <note n="1">gloss</note>.\n d') == "a b c. d"
    assert clean_verse("comerás <H0398>; y <G2316> Dios") == "comerás; y Dios"
    assert clean_verse('God<note type="x">Or, gods</note>created<l/>.') == "God created."
    assert clean_verse("Y ACONTECIÓ en los días") == "Y Aconteció en los días"
    assert (
        clean_verse("Y dijo Dios á Moisés: YO SOY EL QUE SOY.") == "Y dijo Dios á Moisés: YO SOY EL QUE SOY."
    )


def test_bad_text_raises_a_one_line_data_error():
    with pytest.raises(DataError, match="no verses"):
        parse_plain("<html>not a bible</html>\n", "page.html")
    with pytest.raises(DataError, match="share no verse"):
        pair_verses(parse_plain("Genesis 1:1: In the beginning\n"), parse_plain("Exodus 1:1: Estos\n"))
    with pytest.raises(DataError, match="no test verses"):
        split_pairs([("Genesis 1:1", "a", "b")], test_books=("Ruth",))


def _write_dumps(folder, web=WEB, rv=RV):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SOURCE_MODULE}.txt").write_text(web, encoding="utf-8")
    (folder / f"{TARGET_MODULE}.txt").write_text(rv, encoding="utf-8")
    return folder


def test_missing_or_corrupt_dumps_name_the_file_and_the_fix(tmp_path):
    task = TranslateTransformer(vocab_size=150, cache_dir=tmp_path / "cache", test_books=("Psalms",))
    missing = tmp_path / "nowhere"
    assert "does not exist" in task.data_status(missing)
    with pytest.raises(DataError, match="does not exist"):
        task.dataset("train", missing, None, 0)

    folder = tmp_path / "dumps"
    folder.mkdir()
    (folder / f"{SOURCE_MODULE}.txt").write_text(WEB, encoding="utf-8")
    status = task.data_status(folder)
    assert f"no {TARGET_MODULE}.txt in {folder}" in status and "diatheke -b spaRV1909eb -f plain" in status
    with pytest.raises(DataError, match=f"no {TARGET_MODULE}.txt in"):
        task.dataset("train", folder, None, 0)

    (folder / f"{TARGET_MODULE}.txt").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary \x00\x9c")
    assert task.data_status(folder) is None  # present; its content is checked on reading
    with pytest.raises(DataError, match="is not UTF-8 text") as e:
        task.dataset("train", folder, None, 0)
    assert "\n" not in str(e.value)
    (folder / f"{TARGET_MODULE}.txt").write_text("Chapter one\nIt was a dark night.\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no verses"):
        task.dataset("train", folder, None, 0)


def test_status_names_the_packages_when_diatheke_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    task = TranslateTransformer(cache_dir=tmp_path)
    status = task.data_status(None)
    assert (
        status.endswith(INSTALL_HINT)
        and "sudo apt-get install diatheke sword-text-web sword-text-sparv" in status
    )
    with pytest.raises(DataError, match="sudo apt-get install diatheke sword-text-web sword-text-sparv"):
        task.dataset("test", None, None, 0)
    cached = tmp_path / "translate-v1" / "diatheke" / "pairs.json"  # what a first run leaves
    cached.parent.mkdir(parents=True)
    cached.write_text('{"pairs": [["Ruth 1:1", "In the days", "En los días"]]}', encoding="utf-8")
    assert task.data_status(None) is None


def test_parser_on_real_diatheke_output():
    """A few verses straight from the installed modules (the packages the task needs)."""
    if shutil.which("diatheke") is None:
        pytest.fail(f"diatheke is not installed; {INSTALL_HINT}")
    out = {}
    for module in (SOURCE_MODULE, TARGET_MODULE):
        cmd = ["diatheke", "-b", module, "-f", "plain", "-k", "Psalms 2:12-3:2"]
        out[module] = parse_plain(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout)
    web, rv = out[SOURCE_MODULE], out[TARGET_MODULE]
    assert list(web) == list(rv) == ["Psalms 2:12", "Psalms 3:1", "Psalms 3:2"]
    assert web["Psalms 2:12"].endswith("Blessed are all those who take refuge in him.")  # no title
    assert (
        web["Psalms 3:1"]
        == "Yahweh, how my adversaries have increased! Many are those who rise up against me."
    )


# -- BPE -------------------------------------------------------------------------------------

TEXTS = [
    "In the beginning, God created the heavens and the earth.",
    "En el principio crió Dios los cielos y la tierra.",
    "The earth was formless and empty; darkness was on the surface of the deep.",
    "Y la tierra estaba desordenada y vacía, y las tinieblas estaban sobre la haz del abismo.",
    "God said, “Let there be light,” and there was light.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
]


def test_bpe_is_deterministic_round_trips_and_respects_the_size(tmp_path):
    a = BPE.train(TEXTS, vocab_size=90)
    b = BPE.train(list(reversed(TEXTS)), vocab_size=90)
    assert a.to_dict() == b.to_dict() and len(a) == 90
    for text in TEXTS:
        ids = a.encode(text)
        assert a.decode(ids) == text and max(ids) < 90
        assert len(ids) < len(text)  # it did merge
    assert a.decode(a.encode("  the   earth\n")) == "the earth"  # whitespace normalized
    assert UNK in a.encode("Zürich")  # "Z", "ü" were never seen
    assert a.decode([*a.encode("the light"), EOS, *a.encode("tail")]) == "the light"
    big = BPE.train(TEXTS, vocab_size=10_000)  # runs out of pairs seen twice: smaller
    assert len(big) < 10_000 and all(big.decode(big.encode(t)) == t for t in TEXTS)

    path = a.save(tmp_path / "bpe.json")
    assert BPE.load(path).to_dict() == a.to_dict()
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read BPE file"):
        BPE.load(path)
    with pytest.raises(ValueError, match="smaller than"):
        BPE.train(TEXTS, vocab_size=20)


# -- model, training, evaluation -----------------------------------------------------------------


def _tiny_task(tmp_path, **kw):
    config = dict(vocab_size=150, max_tokens=160, dim=32, layers=(1, 1), heads=2, hidden=64, dropout=0.0)
    config.update(kw)
    return TranslateTransformer(cache_dir=tmp_path / "cache", test_books=("Psalms",), **config)


def test_registry_and_defaults():
    task = tasks.get("translate-transformer")
    assert isinstance(task, TranslateTransformer)
    assert task.name == "translate-transformer" and task.metric_name == "bleu" and task.higher_is_better
    assert task.defaults.optimizer == "adam" and task.defaults.batch_size == 32
    assert task.packages == ("diatheke", "sword-text-web", "sword-text-sparv")


def test_attention_matmuls_are_quantized_by_convert():
    torch.manual_seed(0)
    task = TranslateTransformer(vocab_size=200, dim=32, layers=(2, 2), heads=4, hidden=64)
    model = task.build_model()
    assert not any(isinstance(m, nn.MultiheadAttention | nn.Transformer) for m in model.modules())
    matmuls = [m for m in model.modules() if isinstance(m, QMatmul)]
    assert len(matmuls) == 2 * (2 + 2 * 2)  # scores and mix in each self / cross attention
    src, tgt = torch.randint(4, 200, (3, 7)), torch.randint(4, 200, (3, 5))
    convert(model, "ibm4", example_input=(src, tgt), verbose=False)
    assert all(not m.quant.spec.is_fp32 for m in model.modules() if isinstance(m, QMatmul))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, QLinear) and not m.quant.spec.is_fp32 for m in linears)
    assert model.project.weight is model.embed.weight  # the tie survives conversion
    assert model(src, tgt).shape == (3, 5, 200)


def test_attention_probabilities_get_their_own_role():
    """The p·v matmuls take the recipe's attention_probs spec, the q·kᵀ ones its matmul spec."""
    task = TranslateTransformer(vocab_size=200, dim=32, layers=(1, 1), heads=4, hidden=64)
    model = task.build_model()
    src, tgt = torch.randint(4, 200, (2, 6)), torch.randint(4, 200, (2, 5))
    recipe = recipes.get("ibm4-sawb-nvfp4grad-nvprobs")
    convert(model, recipe, example_input=(src, tgt), verbose=False)
    specs = {n: m.quant.spec for n, m in model.named_modules() if isinstance(m, QMatmul)}
    assert (
        sorted(n.rpartition(".")[2] for n, s in specs.items() if s == recipe.spec_for("attention_probs"))
        == ["mix"] * 3
    )
    assert (
        sorted(n.rpartition(".")[2] for n, s in specs.items() if s == recipe.spec_for("matmul"))
        == ["scores"] * 3
    )
    assert recipe.spec_for("attention_probs").activation.format == "nvfp4"
    model(src, tgt).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("recipe", ["fp32", "ibm4"])
def test_cached_greedy_decoding_matches_the_full_forward(recipe):
    """Greedy decoding runs the decoder one token at a time on cached keys and values; it
    must pick what the teacher-forced forward pass picks on its own output."""
    task = TranslateTransformer(vocab_size=50, dim=32, layers=(2, 2), heads=2, hidden=64, dropout=0.0)
    torch.manual_seed(0)
    model = task.build_model()
    src = torch.randint(4, 50, (3, 9))
    src[0, 6:] = 0  # padding
    if recipe != "fp32":
        convert(model, recipe, example_input=(src, src), verbose=False)
    model(src, src).sum().backward()  # a training-mode pass fixes PACT's clip levels
    model.eval()
    out = model.greedy(src, max_len=8)
    tgt_in = torch.cat([torch.full((3, 1), 1), out[:, :-1]], dim=1)
    after_eos = (out == EOS).long().cumsum(1) - (out == EOS).long() > 0  # greedy pads there
    assert torch.equal(model(src, tgt_in).argmax(-1).masked_fill(after_eos, 0), out)


@pytest.mark.parametrize("recipe", ["fp32", "ibm4"])
def test_one_training_step_and_an_evaluation(tmp_path, recipe):
    folder = _write_dumps(tmp_path / "dumps")
    task = _tiny_task(tmp_path)
    assert task.data_status(folder) is None
    train = task.dataset("train", folder, None, seed=0)
    test = task.dataset("test", folder, None, seed=0)
    assert len(train) == 4 and len(test) == 3 and len(task.bpe) <= 150
    assert sorted(test.keys) == ["Psalms 2:11", "Psalms 3:1", "Psalms 3:2"]
    assert len(task.dataset("train", folder, limit=2, seed=0)) == 2
    assert any((tmp_path / "cache" / "translate-v1").glob("dir-*/pairs.json"))
    assert any((tmp_path / "cache" / "translate-v1").glob("dir-*/bpe-150-*.json"))

    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate([train[i] for i in range(len(train))])
    assert batch["src"].shape[0] == 4 and batch["src_mask"].dtype == torch.bool
    assert (batch["src"][batch["src_mask"]] != 0).all() and (batch["tgt_in"][:, 0] == 1).all()
    if recipe != "fp32":
        convert(model, recipe, example_input=task.model_inputs(batch), verbose=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss, n = task.loss(model, batch)
    assert n == 4 and loss.ndim == 0 and torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    loader = torch.utils.data.DataLoader(test, batch_size=2, collate_fn=task.collate)
    metrics = task.evaluate(model, loader)
    assert set(metrics) >= {"bleu", "loss"} and 0 <= metrics["bleu"] <= 100 and metrics["sentences"] == 3
    assert task.evaluate(model, loader, limit=1)["sentences"] == 1
    assert model.training  # evaluate puts the mode back

    # per-sentence counts: their sums give back sacreBLEU's corpus BLEU of the same decodes
    again, counts = task.evaluate_examples(model, loader)
    model.eval()
    with torch.no_grad():
        hyps = [h for b in loader for h in task.decode(model, b["src"])]
    refs = [r for b in loader for r in b["refs"]]
    model.train()
    assert again == metrics and counts.shape == (3, 10)
    assert (
        task.metric_from_counts(counts.sum(0)) == sacrebleu.corpus_bleu(hyps, [refs]).score == metrics["bleu"]
    )
    assert counts[:, 0].sum() == sacrebleu.corpus_bleu(hyps, [refs]).sys_len


def test_cache_is_reused_and_rebuilt_when_corrupt(tmp_path):
    folder = _write_dumps(tmp_path / "dumps")
    task = _tiny_task(tmp_path)
    first = task.dataset("train", folder, None, seed=0)
    (pairs_file,) = (tmp_path / "cache" / "translate-v1").glob("dir-*/pairs.json")
    (bpe_file,) = pairs_file.parent.glob("bpe-*.json")
    pairs_file.write_text("[truncated", encoding="utf-8")
    bpe_file.write_text("", encoding="utf-8")
    again = _tiny_task(tmp_path).dataset("train", folder, None, seed=0)
    assert again.src == first.src and again.refs == first.refs
    assert [p.name for p in pairs_file.parent.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_greedy_decoding_learns_to_copy(tmp_path):
    """~200 Adam steps on a copy task, then greedy decoding through `evaluate`: BLEU > 50."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"] + [
        "eta",
        "theta",
        "iota",
        "kappa",
        "mu",
        "pi",
    ]
    gen = torch.Generator().manual_seed(0)

    def sentences(n):
        return [" ".join(words[int(i)] for i in torch.randint(0, 12, (int(k),), generator=gen))
                for k in torch.randint(4, 8, (n,), generator=gen)]  # fmt: skip

    task = TranslateTransformer(vocab_size=60, dim=64, layers=(1, 1), heads=4, hidden=128, dropout=0.0,
                                label_smoothing=0.0)  # fmt: skip
    task.bpe = BPE.train(sentences(200), vocab_size=60)

    def data(n):
        texts = sentences(n)
        ids = [task.bpe.encode(t) for t in texts]
        return TranslationPairs(ids, ids, texts, [str(i) for i in range(n)])

    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = torch.utils.data.DataLoader(data(3200), batch_size=16, shuffle=True, collate_fn=task.collate)
    for batch in train:
        loss, _ = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = torch.utils.data.DataLoader(data(64), batch_size=32, collate_fn=task.collate)
    metrics = task.evaluate(model, test)
    assert metrics["bleu"] > 50, metrics

import os
import sys

# the format tests import tests/reference.py as `reference`, whatever pytest's import mode
sys.path.insert(0, os.path.dirname(__file__))

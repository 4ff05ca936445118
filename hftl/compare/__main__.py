"""`python -m hftl.compare <cell_config.json>`: one cell, what the grid's child processes run."""

import sys

from hftl.compare.grid import run_cell_file

if __name__ == "__main__":
    run_cell_file(sys.argv[1])

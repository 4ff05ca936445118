"""Image classification demo: `python app.py` serves $MODEL_ID, else the model under `models:` in README.md.

In the hftl repo: python spaces/image-classification/app.py --model <hub id or local output_dir>
(`hftl space publish` copies this file and the shared builder, as hftl_space.py, into a Space.)
"""

from pathlib import Path

try:
    from hftl_space import main  # a published Space: the builder sits next to this file
except ModuleNotFoundError as error:
    if error.name != "hftl_space":
        raise
    from hftl.spaces.builder import main

if __name__ == "__main__":
    main("image-classification", app_dir=Path(__file__).parent)

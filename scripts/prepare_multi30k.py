#!/usr/bin/env python3
"""Put Multi30k (de, en) as plain text files `{train,valid,test2016}.{de,en}` into a folder.

From a local copy (a folder with those files, e.g. ../shared/data/multi30k) nothing needs doing:
point `data.root` at it. Without one, this script fetches the HF hub dataset `bentrevett/multi30k`
(splits train / validation / test, columns en and de) and writes the files, so that the rest of
attnmt reads Multi30k the same way in both cases.

usage: python scripts/prepare_multi30k.py [OUT_DIR]     (default: data/multi30k)
"""

from __future__ import annotations

import sys
from pathlib import Path

SPLITS = {"train": "train", "validation": "valid", "test": "test2016"}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "data/multi30k")
    if all((out / f"{name}.{lang}").is_file() for name in SPLITS.values() for lang in ("de", "en")):
        print(f"Multi30k is already in {out}")
        return 0
    try:
        from datasets import load_dataset

        dataset = load_dataset("bentrevett/multi30k")
    except Exception as err:  # no network, no hub access, or the dataset moved
        # One line, whatever the error's own text: it is the last thing a newcomer without network reads.
        print(
            f"error: could not fetch the HF hub dataset bentrevett/multi30k ({type(err).__name__}): put Multi30k "
            f"task 1 (raw) in {out} as train, valid and test2016 .de/.en files (data/task1/raw of "
            "https://github.com/multi30k/dataset, gunzipped and renamed), or pass the folder that holds them "
            "(scripts/quickstart.sh FOLDER)",
            file=sys.stderr,
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for hub_split, name in SPLITS.items():
        for lang in ("de", "en"):
            lines = [" ".join(text.split()) for text in dataset[hub_split][lang]]
            (out / f"{name}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"{name}: {len(dataset[hub_split])} pairs -> {out}/{name}.{{de,en}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A data source that is a datasets.save_to_disk folder someone else wrote. Its state.json lists the
.arrow shards by `filename` and a DatasetDict's dataset_dict.json lists its `splits`, and
datasets.load_from_disk joins each to the folder as written. On main 111e863 a state.json naming
`../other/data-00000-of-00001.arrow` (or an absolute path), or a split `../other`, made
`meshbake prepare` train on records from a folder the recipe never named. Now prepare refuses
them (DataError, exit 3) before datasets reads anything; real save_to_disk folders still load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from meshbake.runtime.prepare import DataError, prepare

from tests.test_data import base, with_data  # noqa: F401 (base: the compiled tiny plan fixture)

QUIET = {"quiet": True, "log": lambda s: None}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """mine/ (the recipe's dataset), other/ (someone else's, its records say so), dict/ (a DatasetDict)."""
    import datasets

    root = tmp_path_factory.mktemp("disk")
    datasets.Dataset.from_dict({"text": [f"To be or not to be, record {i}." for i in range(40)]}).save_to_disk(
        str(root / "mine"))
    datasets.Dataset.from_dict({"text": [f"SECRET from elsewhere {i}." for i in range(40)]}).save_to_disk(
        str(root / "other"))
    datasets.DatasetDict({"train": datasets.load_from_disk(str(root / "mine"))}).save_to_disk(str(root / "dict"))
    return root


def _edit(src: Path, dst: Path, file: str, edit) -> Path:
    shutil.copytree(src, dst)
    obj = json.loads((dst / file).read_text())
    edit(obj)
    (dst / file).write_text(json.dumps(obj))
    return dst


@pytest.mark.parametrize("how", ["parent", "absolute", "split"])
def test_a_save_to_disk_folder_naming_files_outside_itself_is_refused(saved, tmp_path, base, how):  # noqa: F811
    arrow = next((saved / "other").glob("*.arrow")).name
    if how == "split":
        folder = _edit(saved / "dict", tmp_path / "ds", "dataset_dict.json",
                       lambda o: o.update(splits=["train", f"../../{saved.name}/other"]))
        (folder / f"../../{saved.name}/other").resolve(strict=True)          # the name reaches other/
    else:
        name = f"../../{saved.name}/other/{arrow}" if how == "parent" else str(saved / "other" / arrow)
        folder = _edit(saved / "mine", tmp_path / "ds", "state.json",
                       lambda o: o["_data_files"][0].update(filename=name))
        (folder / name).resolve(strict=True)
    plan = with_data(base, tmp_path, "text", folder)
    with pytest.raises(DataError, match="names .*not a name inside the folder"):
        prepare(plan, **QUIET)


def test_real_save_to_disk_folders_still_prepare(saved, tmp_path, base):  # noqa: F811
    for name in ("mine", "dict"):
        plan = with_data(base, tmp_path / name, "text", saved / name)
        assert prepare(plan, **QUIET).is_dir()

"""Records medaug reads back are checked before they are trusted: run records, checkpoint states (manifest lines:
tests/test_folder.py). Each bad record fails in one line naming the file and the field."""

from __future__ import annotations

import json

import pytest
import torch

from medaug.run_record import RunRecordError, read_run_record
from medaug.training.checkpoint import CheckpointError, check_checkpoint, save_checkpoint


@pytest.mark.parametrize("record, message", [
    ({}, r"lacks field\(s\) \['base_model', 'resolution'\]"),
    ([], "expected a JSON object, got list"),
    ({"version": 2, "base_model": "m", "script": "finetune"}, r"lacks field\(s\) \['resolution'\]"),
    ({"version": 2, "base_model": "m", "script": "finetune", "resolution": "64"}, "field 'resolution' should be int"),
    ({"version": 2, "base_model": "m", "script": "finetune", "resolution": 64, "controlnet": "no"},
     "field 'controlnet' should be bool"),
    ({"version": "2", "base_model": "m", "resolution": 64}, "field 'version' should be int"),
])
def test_a_damaged_run_record_is_refused_naming_the_file_and_field(tmp_path, record, message):
    (tmp_path / "medaug_args.json").write_text(json.dumps(record))
    with pytest.raises(RunRecordError, match=message) as caught:
        read_run_record(tmp_path)
    assert str(tmp_path / "medaug_args.json") in str(caught.value)


def checkpoint(folder):
    module = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(folder, 4, {"unet": module}, optimizer, scheduler, {"rank": 4})


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.update(step=2), "field 'step' says 2, but the checkpoint folder is checkpoint-4"),
    (lambda state: state.update(step="4"), "field 'step' should be int"),
    (lambda state: state.update(configuration=[]), "field 'configuration' should be dict"),
])
def test_a_checkpoint_whose_state_disagrees_with_its_folder_is_refused(tmp_path, edit, message):
    folder = checkpoint(tmp_path / "checkpoint-4")
    check_checkpoint(folder)  # as written, it reads back
    state = json.loads((folder / "training_state.json").read_text())
    edit(state)
    (folder / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=message):
        check_checkpoint(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda result: result.pop("metrics"), r"lacks field\(s\) \['metrics'\]"),
    (lambda result: result.update(seed="0"), "field 'seed' should be int"),
])
def test_a_damaged_bench_run_result_is_refused_naming_the_file_and_field(tmp_path, edit, message):
    from medaug.segmentation.study import Run, StudyError, load_run_result

    run = Run("real", 1.0, 0.0, 0)
    path = tmp_path / "runs" / run.run_id / "result.json"
    path.parent.mkdir(parents=True)
    result = {"run_id": run.run_id, "arm": "real", "real_fraction": 1.0, "ratio": 0.0, "seed": 0, "n_train_real": 4,
              "n_train_synthetic": 0, "n_train_synthetic_requested": 0, "steps": 2, "seconds": 0.1,
              "metrics": {"dice": [0.5]}}
    path.write_text(json.dumps(result))
    assert load_run_result(tmp_path, run) == result
    edit(result)
    path.write_text(json.dumps(result))
    with pytest.raises(StudyError, match=message):
        load_run_result(tmp_path, run)


@pytest.mark.parametrize("text, message", [
    ("{", "not readable JSON"),
    ("[1]", "expected a JSON object, got list"),
    ('{"generator": "pix2pix", "generated": {}, "fidelity": {}, "dice": [], "filter": null, "kept": []}',
     r"lacks field\(s\) \['run_dir'\]"),
    ('{"generator": "pix2pix", "run_dir": "r", "generated": 4, "fidelity": {}, "dice": [], "filter": null, '
     '"kept": []}', "field 'generated' should be dict"),
])
def test_a_study_s_stage_record_is_checked_when_read_back(tmp_path, text, message):
    from medaug.lowdata.study import PAIRS_FIELDS, LowDataStudyError, _read_back

    (tmp_path / "pairs.json").write_text(text)
    with pytest.raises(LowDataStudyError, match=message) as caught:
        _read_back(tmp_path / "pairs.json", PAIRS_FIELDS, "; delete that folder")
    assert str(caught.value).startswith(str(tmp_path / "pairs.json"))
    assert str(caught.value).endswith("delete that folder")

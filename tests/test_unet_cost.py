"""benchmarks/unet_cost.py: the UNet cost table's rows and its refusal of bad options."""

import csv
import re

import pytest
from conftest import benchmark_module


def test_one_row_per_patch_size_and_depth_with_the_model_it_names(tmp_path, one_thread):
    uc = benchmark_module("unet_cost")
    out = tmp_path / "cost.csv"
    assert uc.main(["--patch-sizes", "2", "--layers-per-block", "1,2", "--attention-head-dim", "1", "--batch", "2",
                    "--repeats", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["patch_size"], r["layers_per_block"], r["attention_head_dim"]) for r in rows] == \
        [("2", "1", "1"), ("2", "2", "1")]
    assert float(rows[1]["parameters_M"]) > float(rows[0]["parameters_M"])  # the second layer is really built
    for r in rows:
        assert r["model_input"] == "4x16x16"
        for col in ("train_step_s", "guided_unet_call_s", "unguided_unet_call_s"):
            assert float(r[col]) > 0


@pytest.mark.parametrize("argv, message", [
    (["--layers-per-block", "one"], "--layers-per-block: 'one': expected a comma-separated list of int"),
    (["--patch-sizes", "0"], r"patch sizes \[0\].*must all be >= 1"),
    (["--attention-head-dim", "0"], "--attention-head-dim 0 must all be >= 1"),
])
def test_bad_options_are_refused_before_any_model_is_built(tmp_path, capsys, argv, message):
    uc = benchmark_module("unet_cost")
    with pytest.raises(SystemExit):
        uc.main(argv + ["--out", str(tmp_path / "never.csv")])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "never.csv").exists()

"""benchmarks/train_step.py on CPU: the cases' overrides, the refusal of unknown names, and a smoke
run of the HSTU case without bias under each impl (on CPU, mosaic runs the jnp reference)."""

import json

from benchmarks import train_step
from scaling.config import load_run_config


def test_mosaic_sets_the_attention_alone_and_only_where_a_case_has_it():
    path, overrides = train_step.case_overrides("hstu_stu", "mosaic", smoke=False)
    config = load_run_config(path, overrides)
    assert config.model.attention_impl == "mosaic" and config.model.norm_impl == "auto"
    assert not config.model.relative_bias and config.model.qk_dim == config.model.v_dim == 128
    assert train_step.impls_of("hstu", ["pallas", "xla", "mosaic"]) == ["pallas", "xla"]
    assert train_step.impls_of("hstu_stu", ["pallas", "mosaic"]) == ["pallas", "mosaic"]
    _, overrides = train_step.case_overrides("hstu", "pallas", smoke=True)
    assert "model.attention_impl=pallas" in overrides and "model.norm_impl=pallas" in overrides


def test_unknown_cases_and_impls_exit_2_with_one_line(capsys):
    assert train_step.main(["--smoke", "--cases", "hstu,nope"]) == 2
    assert train_step.main(["--smoke", "--impls", "triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope" in err[0] and "triton" in err[1]


def test_smoke_run_writes_a_row_per_impl(tmp_path):
    out = tmp_path / "train_step.json"
    assert train_step.main(["--smoke", "--cases", "hstu_stu", "--impls", "mosaic,xla", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["interpret"] is True
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"mosaic", "xla"}
    for row in rows.values():
        assert "error" not in row and row["step_ms"] > 0 and row["mfu"] > 0
    # the same model, data, seed and steps (on CPU both attentions are the jnp reference): one loss
    assert abs(rows["mosaic"]["loss"] - rows["xla"]["loss"]) < 0.05 * abs(rows["xla"]["loss"])

"""Every mitigation runs through train_mitigations.py's front end on a tiny random model, writes credit logs
that load, and analyze_credit.py turns them into its tables and plot."""

from __future__ import annotations

import errno
import json
import os

import pandas as pd
import pytest
import torch
import yaml

import analyze_credit
import checkpoint as ckpt
import fileio
import train_mitigations
import trainer
from conftest import run_config
from credit_logger import read_logs
from grpo_mitigations import WEIGHTERS
from parts import config_from_dict

REQUIRED = ["step", "episode_idx", "group_idx", "position", "token_id", "log_prob", "entropy", "reward",
            "advantage", "weight", "contribution", "weighted_contribution"]


@pytest.mark.parametrize("name", sorted(WEIGHTERS))
def test_mitigation_runs_and_its_credit_logs_analyze(name, tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = run_config(tiny_assets, tmp_path, training={"max_steps": 3, "log_dir": "logs", "ckpt_dir": "ckpt"},
                     credit={"enabled": False, "dir": "credit_logs"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    flags = {"attribution": ["--attribution_entropy_coef", "0.01"], "entropy_masking": ["--mask_percentile", "50"],
             "outcome_conditional": ["--think_discount", "0.25"]}.get(name, [])
    assert train_mitigations.main(["--config", "c.yaml", "--mitigation", name, *flags]) == 0

    for d in (f"logs_{name}", f"credit_logs_{name}", f"ckpt_{name}"):
        assert (tmp_path / d).is_dir(), d
    # the final file indexes the step files (credit-log format 2): the run's rows are read through it
    final = read_logs(tmp_path / f"credit_logs_{name}" / "credit_logs_final.pkl")
    assert set(REQUIRED) <= set(final.columns)
    assert sorted(final["step"].unique()) == [1, 2, 3]
    assert final.attrs["mitigation"] == name
    pd.testing.assert_series_equal(final["contribution"], final["advantage"] * final["log_prob"], check_names=False,
                                   rtol=1e-6)
    if name == "none":
        assert (final["weight"] == 1).all()
    if name == "entropy_masking":
        assert set(final["weight"].unique()) <= {0.0, 1.0}
    if name == "attribution":
        metrics = [json.loads(x) for x in (tmp_path / f"logs_{name}" / "metrics.jsonl").read_text().splitlines()]
        assert all(k in metrics[1] for k in ("attribution/entropy", "attribution/max", "attribution/min", "attribution/std"))
        assert (tmp_path / f"ckpt_{name}" / "step_000003" / "attribution_head.safetensors").is_file()

    out = tmp_path / "analysis"
    analyze_credit.main(["--log_path", f"credit_logs_{name}", "--tokenizer_path", str(tiny_assets["model"]),
                         "--output_dir", str(out)])
    for f in ("position_bins.csv", "token_types.csv", "position_type.csv", "reward_split.csv", "tstats.csv",
              "top_tokens.csv", "summary.md", "credit_analysis.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f


def test_unknown_mitigation_and_bad_parameter_fail_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_mitigations.main(["--config", "config_tiny.yaml", "--mitigation", "magic"])
    assert "invalid choice" in capsys.readouterr().err
    assert train_mitigations.main(["--config", "config_tiny.yaml", "--mitigation", "inverse_logprob",
                                   "--logprob_offset", "0", f"model.path={tmp_path / 'never_built'}"]) == 2
    assert "mitigation.logprob_offset" in capsys.readouterr().err
    # the old flag, easily read as a clip epsilon, names its new name
    with pytest.raises(SystemExit):
        train_mitigations.main(["--config", "config_tiny.yaml", "--mitigation", "inverse_logprob", "--epsilon", "0.1"])
    assert "--epsilon was renamed: use --logprob_offset" in capsys.readouterr().err
    assert not (tmp_path / "never_built").exists()


def test_output_dirs_sit_next_to_the_configured_ones():
    o = train_mitigations.mitigation_overrides("inverse_logprob", {"logprob_offset": 0.1, "think_discount": None},
                                               "runs/x/logs", "runs/x/credit_logs", "ckpt")
    assert "training.log_dir=runs/x/logs_inverse_logprob" in o
    assert "credit.dir=runs/x/credit_logs_inverse_logprob" in o
    assert "training.ckpt_dir=ckpt_inverse_logprob" in o
    assert "mitigation.logprob_offset=0.1" in o and not any("think_discount" in x for x in o)


def test_attribution_head_resumes_exactly(tiny_assets, tmp_path):
    def cfg(out, steps):
        return config_from_dict(run_config(tiny_assets, out, training={"max_steps": steps},
                                           mitigation={"name": "attribution", "attribution_entropy_coef": 0.01}))
    trainer.train(cfg(tmp_path / "full", 4))
    trainer.train(cfg(tmp_path / "half", 2))
    trainer.train(cfg(tmp_path / "half", 4), resume=True)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "ckpt" / "step_000004" / "attribution_head.safetensors"))
    b = load_file(str(tmp_path / "half" / "ckpt" / "step_000004" / "attribution_head.safetensors"))
    mid = load_file(str(tmp_path / "half" / "ckpt" / "step_000002" / "attribution_head.safetensors"))
    assert a.keys() == b.keys() == {"proj.weight"} and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj.weight"], mid["proj.weight"])  # it trained


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tiny_assets, tmp_path, monkeypatch):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 2, "ckpt_save_interval": 1}))
    real = fileio.shutil.disk_usage
    calls = {"n": 0}

    def usage(path):
        u = real(path)
        calls["n"] += 1
        full = (tmp_path / "ckpt" / "step_000001").exists()
        return u._replace(free=10) if full else u

    monkeypatch.setattr(fileio.shutil, "disk_usage", usage)
    with pytest.raises(fileio.DiskFullError, match="not enough disk space") as err:
        trainer.train(cfg)
    assert err.value.errno == errno.ENOSPC and "--resume" in str(err.value)
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == "step_000001"


def test_atomic_write_cleans_up_on_disk_full(tmp_path):
    target = tmp_path / "f.txt"
    fileio.atomic_write_text(target, "old")

    def fails(p):
        p.write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(fileio.DiskFullError, match="previous version is intact"):
        fileio.atomic_write(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]

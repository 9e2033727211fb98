"""CreditLogger: step files, the final index, columns against hand-built rows, resume, atomic writes, reading
a run back in either format."""
import random

import numpy as np
import pandas as pd
import pytest

import credit_logger
from credit_logger import CreditLogger, read_logs
from data_types import Episode, UpdateStats

REQUIRED = ["step", "episode_idx", "group_idx", "position", "token_id", "log_prob", "entropy", "reward",
            "advantage", "weight", "contribution", "weighted_contribution", "length", "logit_grad_norm",
            "in_answer"]


def make_step(step: int, n_episodes: int = 3):
    """Episodes, advantages and UpdateStats for one step, with varied lengths and answer starts."""
    rng = random.Random(step)
    episodes, advantages, stats = [], [], UpdateStats(metrics={})
    for i in range(n_episodes):
        n = rng.randint(1, 6)
        answer_start = [None, 0, rng.randint(0, n - 1), n - 1][i % 4]
        episodes.append(Episode(
            prompt="p", prompt_token_ids=[1, 2], generated_token_ids=[rng.randint(3, 99) for _ in range(n)],
            text="t", reward=round(rng.uniform(-1, 2), 3), reward_info={"answer_reward": 1.0}, finished=True,
            group_idx=i // 2, answer_start=answer_start))
        advantages.append(round(rng.uniform(-2, 2), 3))
        stats.token_log_probs.append([-rng.uniform(0, 5) for _ in range(n)])
        stats.token_entropies.append([rng.uniform(0, 3) for _ in range(n)])
        stats.token_weights.append([rng.uniform(0, 2) for _ in range(n)])
        stats.token_logit_grad_norms.append([rng.uniform(0, 1.4) for _ in range(n)])
    return episodes, advantages, stats


def expected_rows(step: int, first_episode_idx: int, episodes, advantages, stats) -> list[dict]:
    rows = []
    for i, ep in enumerate(episodes):
        n = len(ep.generated_token_ids)
        for t in range(n):
            lp, a, w = stats.token_log_probs[i][t], advantages[i], stats.token_weights[i][t]
            rows.append(dict(
                step=step, episode_idx=first_episode_idx + i, group_idx=ep.group_idx, position=t, length=n,
                token_id=ep.generated_token_ids[t], log_prob=lp, entropy=stats.token_entropies[i][t],
                reward=ep.reward, advantage=a, weight=w, contribution=a * lp, weighted_contribution=w * a * lp,
                logit_grad_norm=stats.token_logit_grad_norms[i][t],
                in_answer=ep.answer_start is not None and t >= ep.answer_start))
    return rows


def assert_frame_matches(frame: pd.DataFrame, rows: list[dict]) -> None:
    assert isinstance(frame, pd.DataFrame)
    assert set(REQUIRED) <= set(frame.columns)
    assert len(frame) == len(rows)
    for col in REQUIRED:
        want = [r[col] for r in rows]
        got = frame[col].to_numpy()
        if isinstance(want[0], float):
            np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-6, atol=1e-6, err_msg=col)
        else:
            assert got.tolist() == want, col


def run_steps(logger: CreditLogger, steps, first_episode_idx: int = 0) -> dict[int, list[dict]]:
    """Log the given steps; return each step's expected rows."""
    by_step, idx = {}, first_episode_idx
    for step in steps:
        eps, adv, stats = make_step(step)
        logger.log_step(step, eps, adv, stats)
        by_step[step] = expected_rows(step, idx, eps, adv, stats)
        idx += len(eps)
    return by_step


def no_temp_files(directory) -> bool:
    return all(not p.name.startswith(".") and not p.name.endswith(".tmp") for p in directory.iterdir())


def test_step_files_hold_their_interval_and_the_final_file_indexes_them(tmp_path):
    logger = CreditLogger(tmp_path, save_interval=2, mitigation="entropy_weighted")
    rows = run_steps(logger, [1])
    assert list(tmp_path.iterdir()) == []  # nothing written mid-interval
    rows |= run_steps(logger, [2], first_episode_idx=3)
    f2 = tmp_path / "credit_logs_step_000002.pkl"
    assert f2.exists()
    assert logger._chunks == []  # bounded memory: the buffer is empty after a flush
    assert_frame_matches(pd.read_pickle(f2), rows[1] + rows[2])

    rows |= run_steps(logger, [3, 4, 5], first_episode_idx=6)
    f4 = tmp_path / "credit_logs_step_000004.pkl"
    assert_frame_matches(pd.read_pickle(f4), rows[3] + rows[4])  # no overlap with steps 1-2
    assert not (tmp_path / "credit_logs_step_000005.pkl").exists()
    assert logger._chunks  # step 5 is buffered

    final = logger.finalize()
    f5 = tmp_path / "credit_logs_step_000005.pkl"
    assert_frame_matches(pd.read_pickle(f5), rows[5])
    assert final == tmp_path / "credit_logs_final.pkl"
    index = pd.read_pickle(final)  # the step files' index, no row of its own
    assert index.to_dict("list") == {"file": [f2.name, f4.name, f5.name], "last_step": [2, 4, 5]}
    assert index.attrs == {"format_version": 2, "kind": "index", "mitigation": "entropy_weighted"}
    assert final.stat().st_size < 2000 < f2.stat().st_size  # the rows are not stored a second time
    all_rows = rows[1] + rows[2] + rows[3] + rows[4] + rows[5]
    for source in (tmp_path, final):  # the run read back from its directory or its final file
        frame = read_logs(source)
        assert_frame_matches(frame, all_rows)
        pd.testing.assert_frame_equal(frame, pd.concat([pd.read_pickle(f) for f in (f2, f4, f5)], ignore_index=True))
        assert frame.attrs["mitigation"] == "entropy_weighted"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "credit_logs_final.pkl", "credit_logs_step_000002.pkl", "credit_logs_step_000004.pkl",
        "credit_logs_step_000005.pkl"]
    assert no_temp_files(tmp_path)


def test_column_values_by_hand(tmp_path):
    ep = Episode(prompt="p", prompt_token_ids=[1], generated_token_ids=[10, 11, 12, 13], text="t", reward=1.1,
                 reward_info={}, finished=False, group_idx=5, answer_start=2)
    ep_none = Episode(prompt="p", prompt_token_ids=[1], generated_token_ids=[20, 21], text="t", reward=0.0,
                      reward_info={}, finished=True, group_idx=6, answer_start=None)
    stats = UpdateStats(metrics={}, token_log_probs=[[-0.5, -1.0, -2.0, -0.25], [-3.0, -0.1]],
                        token_entropies=[[0.1, 0.2, 0.3, 0.4], [1.0, 2.0]],
                        token_weights=[[1.0, 0.5, 2.0, 0.0], [1.5, 1.0]],
                        token_logit_grad_norms=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6]])
    logger = CreditLogger(tmp_path, save_interval=1)
    logger.log_step(7, [ep, ep_none], [-2.0, 0.5], stats)
    f = pd.read_pickle(tmp_path / "credit_logs_step_000007.pkl")
    assert f["position"].tolist() == [0, 1, 2, 3, 0, 1]
    assert f["length"].tolist() == [4, 4, 4, 4, 2, 2]
    assert f["in_answer"].tolist() == [False, False, True, True, False, False]
    assert f["episode_idx"].tolist() == [0, 0, 0, 0, 1, 1]
    assert f["group_idx"].tolist() == [5, 5, 5, 5, 6, 6]
    assert f["step"].tolist() == [7] * 6
    assert f["token_id"].tolist() == [10, 11, 12, 13, 20, 21]
    np.testing.assert_allclose(f["reward"], [1.1] * 4 + [0.0] * 2, rtol=1e-6)
    np.testing.assert_allclose(f["contribution"], [1.0, 2.0, 4.0, 0.5, -1.5, -0.05], rtol=1e-6)
    np.testing.assert_allclose(f["weighted_contribution"], [1.0, 1.0, 8.0, 0.0, -2.25, -0.05], rtol=1e-6)
    assert f["finished"].tolist() == [False] * 4 + [True] * 2


def test_resume_deletes_later_files_and_continues_counter(tmp_path):
    first = CreditLogger(tmp_path, save_interval=2)
    run_steps(first, [1, 2, 3, 4, 5, 6])
    first.finalize()
    state_at_4 = {"next_episode_idx": 12}  # 4 steps x 3 episodes, as a checkpoint at step 4 would hold
    kept = {name: pd.read_pickle(tmp_path / name) for name in
            ("credit_logs_step_000002.pkl", "credit_logs_step_000004.pkl")}

    resumed = CreditLogger(tmp_path, save_interval=2)
    resumed.load_state_dict(state_at_4, resume_step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert resumed.state_dict() == {"next_episode_idx": 12}
    rows = run_steps(resumed, [5, 6, 7], first_episode_idx=12)
    resumed.finalize()
    for name, frame in kept.items():
        pd.testing.assert_frame_equal(pd.read_pickle(tmp_path / name), frame)
    assert_frame_matches(pd.read_pickle(tmp_path / "credit_logs_step_000006.pkl"), rows[5] + rows[6])
    final = read_logs(tmp_path / "credit_logs_final.pkl")
    assert final["episode_idx"].tolist() == sorted(final["episode_idx"])
    assert final.drop_duplicates("episode_idx")["episode_idx"].tolist() == list(range(21))
    assert final["step"].unique().tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert no_temp_files(tmp_path)


def test_flush_with_empty_buffer_writes_nothing(tmp_path):
    logger = CreditLogger(tmp_path, save_interval=3)
    assert logger.flush(1) is None
    assert logger.finalize() is None
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    logger = CreditLogger(tmp_path, save_interval=1)
    run_steps(logger, [1])

    def boom(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk gone")

    monkeypatch.setattr(pd.DataFrame, "to_pickle", boom)
    eps, adv, stats = make_step(2)
    with pytest.raises(RuntimeError):
        logger.log_step(2, eps, adv, stats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credit_logs_step_000001.pkl"]


def test_format_1_runs_still_read_once(tmp_path):
    """A run logged before the index: its final file holds every row again. Its directory reads the step files
    (never both), its final file reads as the rows, and a directory left with only that file reads it."""
    logger = CreditLogger(tmp_path, save_interval=2)
    rows = run_steps(logger, [1, 2, 3, 4])
    logger.finalize()
    steps = [tmp_path / "credit_logs_step_000002.pkl", tmp_path / "credit_logs_step_000004.pkl"]
    old = pd.concat([pd.read_pickle(f) for f in steps], ignore_index=True)
    old.attrs.update({"format_version": 1, "mitigation": "none"})
    old.to_pickle(tmp_path / "credit_logs_final.pkl")
    all_rows = rows[1] + rows[2] + rows[3] + rows[4]
    assert_frame_matches(read_logs(tmp_path), all_rows)
    assert_frame_matches(read_logs(tmp_path / "credit_logs_final.pkl"), all_rows)
    for f in steps:
        f.unlink()
    assert_frame_matches(read_logs(tmp_path), all_rows)


def test_an_index_whose_step_file_is_gone_is_an_error_naming_it(tmp_path):
    logger = CreditLogger(tmp_path, save_interval=1)
    run_steps(logger, [1, 2])
    logger.finalize()
    (tmp_path / "credit_logs_step_000002.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="credit_logs_step_000002.pkl"):
        read_logs(tmp_path / "credit_logs_final.pkl")
    (tmp_path / "credit_logs_step_000001.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="credit_logs_step_000001.pkl"):
        read_logs(tmp_path)
    assert credit_logger.run_files(tmp_path / "elsewhere.pkl") == [tmp_path / "elsewhere.pkl"]


def test_temporary_files_of_a_killed_write_are_removed_on_resume_and_at_the_end(tmp_path):
    logger = CreditLogger(tmp_path, save_interval=1)
    run_steps(logger, [1, 2])
    killed = tmp_path / ".credit_logs_step_000003.pkl.k1ll3d.tmp"  # fileio.atomic_write's name, cut short
    killed.write_bytes(b"partial")
    resumed = CreditLogger(tmp_path, save_interval=1)
    resumed.load_state_dict({"next_episode_idx": 6}, resume_step=2)
    assert not killed.exists()
    killed.write_bytes(b"partial")
    run_steps(resumed, [3], first_episode_idx=6)
    resumed.finalize()
    assert not killed.exists() and no_temp_files(tmp_path)

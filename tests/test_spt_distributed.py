"""SPT under accelerate with 2 gloo ranks (torchrun) against one process: every rank ends with the same prompts,
equal to the one-process result (bitwise for mean, max and random; 1e-5 for K-means with the same seed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "spt_dist.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("spt_dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    single = subprocess.Popen([sys.executable, str(SCRIPT), str(out / "single")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         str(out / "ranks")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    logs = [p.communicate(timeout=300)[0] for p in (single, ranks)]
    assert single.returncode == 0, logs[0][-4000:]
    assert ranks.returncode == 0, logs[1][-4000:]
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    return load(out / "single" / "rank0.pt"), load(out / "ranks" / "rank0.pt"), load(out / "ranks" / "rank1.pt")


CASES = ["kmeans", "mean", "max", "random", "kmeans_shallow_projected", "random_prepared_loader"]


@pytest.mark.parametrize("case", CASES)
def test_ranks_agree_bitwise(runs, case):
    _, rank0, rank1 = runs
    for a, b in zip(rank0[case]["prompts"], rank1[case]["prompts"]):
        assert torch.equal(a, b)
    for name, tensor in rank0[case]["projection"].items():
        assert torch.equal(tensor, rank1[case]["projection"][name])
    assert rank0[case]["spt_init"] == rank1[case]["spt_init"]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process(runs, case):
    single, rank0, _ = runs
    exact = not case.startswith("kmeans")
    assert len(single[case]["prompts"]) == len(rank0[case]["prompts"]) == (1 if "shallow" in case else 3)
    for one, two in zip(single[case]["prompts"], rank0[case]["prompts"]):
        if exact:
            assert torch.equal(one, two)
        else:
            torch.testing.assert_close(two, one, rtol=0, atol=1e-5)
    for name, tensor in single[case]["projection"].items():
        torch.testing.assert_close(rank0[case]["projection"][name], tensor, rtol=0, atol=1e-5)
    one_stats, two_stats = single[case]["stats"], rank0[case]["stats"]
    assert one_stats["num_processes"] == 1 and two_stats["num_processes"] == 2
    assert one_stats["num_images"] == two_stats["num_images"] == 22
    for a, b in zip(one_stats["layers"], two_stats["layers"]):
        assert a["tokens_seen"] == b["tokens_seen"] == 22 * 16 and a["tokens_used"] == b["tokens_used"]
        if "inertia" in a:
            assert abs(a["inertia"] - b["inertia"]) <= 1e-6 * a["inertia"] and a["iterations"] == b["iterations"]
            assert a["iterations"] > 1  # seeded on 32 of the 100 kept tokens: the distributed Lloyd steps did work


def test_no_accelerator_equals_one_process_accelerator(runs):
    single, _, _ = runs
    for a, b in zip(single["kmeans"]["prompts"], single["kmeans_no_accelerator"]["prompts"]):
        assert torch.equal(a, b)


def test_non_finite_tokens_on_one_rank_fail_every_rank_and_write_nothing(runs):
    single, rank0, rank1 = runs
    assert "dataset indices [9]" in single["nonfinite"]["error"] and single["nonfinite"]["unchanged"]
    errors = sorted([rank0["nonfinite"]["error"], rank1["nonfinite"]["error"]], key=lambda e: "other rank" in e)
    assert "dataset indices [9]" in errors[0] and "at the input of layer" in errors[0]
    assert "non-finite tokens (NaN or inf) on 1 other rank(s)" in errors[1]
    assert rank0["nonfinite"]["unchanged"] and rank1["nonfinite"]["unchanged"]

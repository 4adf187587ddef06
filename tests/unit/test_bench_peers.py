"""bench.peers' pure parts: Infinity's command line and launch, the ONNX export's place and command, the round
order, and what the rounds sum up to."""

import hashlib
from pathlib import Path

import pytest

from bench.peers import (
    ARMS,
    BASELINE,
    INFINITY,
    arm_launch,
    ensure_onnx,
    export_command,
    infinity_command,
    ratios,
    round_order,
    server_cores,
    summarize_arm,
    weights_digest,
)

EMBSERVE_ARM, INF_DEFAULT, INF_BF16, INF_OPTIMUM = (a.name for a in ARMS)


def _run(texts_per_s: float, p50: float = 100.0, lone: float = 15.0, cores: dict | None = None) -> dict:
    cpu = {"by_role": cores or {"load generator": 0.2, "infinity": 1.6}, "foreign": 0.01}
    return {"c32": {"texts_per_s": texts_per_s, "latency_ms": {"p50": p50, "p99": 2 * p50}, "errors": {},
                    "cpu": cpu},
            "single_query": {"latency_ms": {"p50": lone}}}


def test_infinity_defaults_arm_passes_only_the_model_and_where_to_listen():
    arm = next(a for a in ARMS if a.name == BASELINE)
    cmd = infinity_command("/peer/bin/infinity_emb", "/models/m", 7997, arm.flags)
    assert cmd == ["/peer/bin/infinity_emb", "v2", "--model-id", "/models/m", "--host", "127.0.0.1",
                   "--port", "7997"]


def test_infinity_bf16_arm_adds_exactly_the_dtype_flag():
    bf16 = next(a for a in ARMS if a.name == INF_BF16)
    cmd = infinity_command("inf", "/m", 1, bf16.flags)
    assert cmd[-2:] == ["--dtype", "bfloat16"]
    assert len(cmd) == len(infinity_command("inf", "/m", 1)) + 2


def test_torch_arms_start_on_the_model_folder_where_they_are():
    for arm in ARMS:
        if arm.server == INFINITY and not arm.onnx:
            launch = arm_launch(arm, "inf", "/models/m", 7997)
            assert launch.command == infinity_command("inf", "/models/m", 7997, arm.flags)
            assert launch.cwd is None and not launch.env


def test_optimum_arm_serves_the_onnx_export_from_inside_it_with_mean_pooling():
    arm = next(a for a in ARMS if a.name == INF_OPTIMUM)
    assert arm.onnx and arm.server == INFINITY
    onnx_model = Path("/ckpt/build/peers/onnx/abc/model")
    launch = arm_launch(arm, "/peer/bin/infinity_emb", "/models/m", 7997, onnx_model)
    # Relative to the folder it starts in, so that optimum-onnx finds the file Infinity names (see bench.peers).
    assert launch.command[:4] == ["/peer/bin/infinity_emb", "v2", "--model-id", "."]
    assert launch.cwd == onnx_model
    assert launch.command[-4:] == ["--engine", "optimum", "--pooling-method", "mean"]
    assert launch.env == {"HF_HUB_CACHE": "/ckpt/build/peers/onnx/abc/hub"}


def test_optimum_arm_without_an_export_is_an_error_not_the_safetensors_folder():
    arm = next(a for a in ARMS if a.onnx)
    with pytest.raises(RuntimeError, match="ONNX export"):
        arm_launch(arm, "inf", "/models/m", 7997, None)


def test_export_runs_the_peers_own_optimum_for_last_hidden_state():
    cmd = export_command("/peer/bin/infinity_emb", "/models/m", Path("/out"))
    assert cmd[0] == "/peer/bin/optimum-cli"
    assert cmd[1:5] == ["export", "onnx", "--model", "/models/m"]
    assert cmd[cmd.index("--task") + 1] == "feature-extraction"
    assert cmd[cmd.index("--library-name") + 1] == "transformers"
    assert cmd[-1] == "/out"


def test_weights_digest_follows_the_weights_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights one")
    (tmp_path / "config.json").write_text("{}")
    first = weights_digest(tmp_path)
    assert first == hashlib.sha256(b"weights one").hexdigest()[:16]
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert weights_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"weights two")
    assert weights_digest(tmp_path) != first


def _fake_peer(tmp_path: Path, script: str) -> str:
    """A peer venv's bin/ with an optimum-cli that runs `script` with the output folder as $1."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    cli = bin_dir / "optimum-cli"
    cli.write_text('#!/bin/sh\nfor last; do :; done\nset -- "$last"\n' + script)
    cli.chmod(0o755)
    (bin_dir / "infinity_emb").write_text("")
    return str(bin_dir / "infinity_emb")


def test_onnx_export_is_made_once_per_weights_and_reused(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"w")
    count = tmp_path / "count"
    binary = _fake_peer(tmp_path, f'mkdir -p "$1" && echo onnx > "$1/model.onnx" && echo x >> {count}\n')
    root = tmp_path / "ckpt"
    first = ensure_onnx(binary, str(model_dir), tmp_path / "export.log", root)
    assert first == root / "build" / "peers" / "onnx" / weights_digest(model_dir) / "model"
    assert (first / "model.onnx").read_text() == "onnx\n"
    assert ensure_onnx(binary, str(model_dir), tmp_path / "export.log", root) == first
    assert count.read_text().count("x") == 1


def test_a_failed_export_leaves_nothing_that_looks_done(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"w")
    binary = _fake_peer(tmp_path, 'mkdir -p "$1" && echo half > "$1/config.json" && echo "no torch" >&2; exit 3\n')
    root = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*no torch"):
        ensure_onnx(binary, str(model_dir), tmp_path / "export.log", root)
    assert not (root / "build" / "peers" / "onnx" / weights_digest(model_dir) / "model").exists()


def test_round_order_rotates_so_every_arm_leads_one_round():
    firsts = {round_order(ARMS, k)[0].name for k in range(len(ARMS))}
    assert firsts == {a.name for a in ARMS}
    assert sorted(a.name for a in round_order(ARMS, 5)) == sorted(a.name for a in ARMS)


def test_server_cores_leave_out_the_load_generator():
    cpu = {"by_role": {"load generator": 0.3, "replica": 1.4, "ingress": 0.2, "proxy": 0.1}}
    assert abs(server_cores(cpu) - 1.7) < 1e-9
    assert server_cores(None) is None


def test_summary_takes_median_and_spread_and_skips_failed_rounds():
    runs = [_run(60.0, p50=300), _run(80.0, p50=500), {"error": "Infinity exited with 1"}, _run(70.0, p50=400)]
    s = summarize_arm(runs)
    assert s["rounds"] == 3
    assert s["texts_per_s_spread"] == {"min": 60.0, "median": 70.0, "max": 80.0}
    assert s["p50_ms"] == 400
    assert s["errors"] == ["Infinity exited with 1"]
    assert s["server_cpu_ms_per_text"][0] == round(1.6 * 1000 / 60.0, 1)


def test_an_arm_that_never_answered_is_reported_not_summarized():
    s = summarize_arm([{"error": "refused"}, {"error": "refused"}])
    assert s["rounds"] == 0 and s["errors"] == ["refused", "refused"]


def test_ratios_set_embserve_against_each_infinity_arm_by_medians_and_round_by_round():
    rounds = [{EMBSERVE_ARM: _run(80.0), INF_DEFAULT: _run(40.0), INF_BF16: _run(50.0)},
              {EMBSERVE_ARM: _run(90.0), INF_DEFAULT: _run(30.0), INF_BF16: {"error": "crashed"}}]
    summaries = {name: summarize_arm([r[name] for r in rounds]) for name in rounds[0]}
    rel = ratios(summaries, rounds, {"float32": 50.0, "bfloat16": 100.0})
    assert rel["embserve_to"][INF_DEFAULT] == {"of_medians": round(85.0 / 35.0, 2), "by_round": [2.0, 3.0]}
    # The round where the bf16 arm failed has no pair.
    assert rel["embserve_to"][INF_BF16]["by_round"] == [1.6]
    assert rel["to_offline"][EMBSERVE_ARM] == {"float32": 1.7, "bfloat16": 0.85}
    assert EMBSERVE_ARM not in rel["embserve_to"]


def test_ratios_of_a_run_without_embserve_keep_the_offline_ratio_and_pair_nothing():
    rounds = [{INF_OPTIMUM: _run(60.0)}]
    summaries = {INF_OPTIMUM: summarize_arm([rounds[0][INF_OPTIMUM]])}
    rel = ratios(summaries, rounds, {"float32": 50.0})
    assert rel == {"to_offline": {INF_OPTIMUM: {"float32": 1.2}}, "embserve_to": {}}


def test_peer_versions_come_from_pip_list_whatever_its_spelling():
    from bench.peers import installed_versions

    listed = [{"name": "infinity_emb", "version": "0.0.78"}, {"name": "Torch", "version": "2.13.0"}]
    assert installed_versions(listed, ("infinity-emb", "torch", "optimum")) == {
        "infinity-emb": "0.0.78", "torch": "2.13.0", "optimum": None}

"""Thread policy on shared CPUs: cores from affinity and the cgroup quota, and onnxruntime sessions without spinning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from runtime_fixtures import make_toy_bundle

from unidg.runtime.cpu_cores import available_cores, cgroup_cpu_limit

V1_MOUNTS = (
    "32 31 0:29 / {root}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "33 31 0:30 / {root}/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_v2(tmp_path: Path, cpu_max: dict[str, str], cgroup: str = "/station/unidg") -> tuple[Path, Path]:
    """A cgroup v2 hierarchy mounted at tmp/cgroup with cpu.max files at the given relative folders."""
    root = tmp_path / "cgroup"
    (root / cgroup.lstrip("/")).mkdir(parents=True)
    for folder, text in cpu_max.items():
        _write(root / folder / "cpu.max", text)
    _write(tmp_path / "mountinfo", f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    _write(tmp_path / "self_cgroup", f"0::{cgroup}\n")
    return tmp_path / "self_cgroup", tmp_path / "mountinfo"


def test_cgroup_v2_quota_the_tightest_ancestor_binds(tmp_path: Path) -> None:
    files = _fake_v2(tmp_path, {"": "max 100000\n", "station": "300000 100000\n", "station/unidg": "max 100000\n"})
    assert cgroup_cpu_limit(*files) == 3.0
    files = _fake_v2(tmp_path / "b", {"station/unidg": "150000 100000\n", "station": "400000 100000\n"})
    assert cgroup_cpu_limit(*files) == 1.5
    assert available_cores(*files) == min(len(os.sched_getaffinity(0)), 2)  # 1.5 cores rounded up


def test_cgroup_v2_without_a_quota_leaves_the_affinity(tmp_path: Path) -> None:
    files = _fake_v2(tmp_path, {"station/unidg": "max 100000\n"})
    assert cgroup_cpu_limit(*files) is None
    assert available_cores(*files) == len(os.sched_getaffinity(0))


def test_cgroup_v2_inside_a_container_reads_the_mount_point(tmp_path: Path) -> None:
    """A container sees its own cgroup as the mount's root: /proc/self/cgroup says 0::/ or a path not under it."""
    files = _fake_v2(tmp_path, {"": "100000 100000\n"}, cgroup="/")
    assert cgroup_cpu_limit(*files) == 1.0
    assert available_cores(*files) == 1


def test_cgroup_v1_cfs_quota_in_a_hybrid_layout(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _write(tmp_path / "mountinfo", V1_MOUNTS.format(root=root))
    _write(tmp_path / "self_cgroup", "4:memory:/job\n2:cpu,cpuacct:/job\n0::/\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "50000\n")
    _write(root / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000\n")
    _write(root / "memory" / "job" / "cpu.cfs_quota_us", "10000\n")  # not the cpu controller: ignored
    files = (tmp_path / "self_cgroup", tmp_path / "mountinfo")
    assert cgroup_cpu_limit(*files) == 0.5
    assert available_cores(*files) == 1
    (root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(*files) is None


def test_unreadable_cgroup_files_mean_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing") is None
    _write(tmp_path / "self_cgroup", "0::/x\n")
    _write(tmp_path / "mountinfo", f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
    _write(tmp_path / "x" / "cpu.max", "garbage\n")
    assert cgroup_cpu_limit(tmp_path / "self_cgroup", tmp_path / "mountinfo") is None


def test_affinity_caps_the_cores() -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:1])
    try:
        assert available_cores() == 1
    finally:
        os.sched_setaffinity(0, cores)


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy", resolution=64)


@pytest.mark.parametrize("spin", [False, True])
def test_onnxruntime_sessions_spin_only_when_asked(toy_bundle: Path, spin: bool) -> None:
    from unidg.runtime.synthesizer import DefectSynthesizer

    with DefectSynthesizer.from_bundle(toy_bundle, **({"spin": True} if spin else {})) as synth:
        for session in synth.backend.sessions.values():
            options = session.get_session_options()
            for pool in ("intra_op", "inter_op"):
                assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == ("1" if spin else "0")
            assert options.intra_op_num_threads == available_cores()


def test_explicit_threads_and_spin_from_the_command_line(toy_bundle: Path) -> None:
    from unidg.core.errors import OptionError
    from unidg.runtime.cli_options import ArgumentParser, add_backend_options, backend_options
    from unidg.runtime.synthesizer import DefectSynthesizer

    parser = ArgumentParser()
    add_backend_options(parser)
    options = backend_options(parser.parse_args(["--threads", "3", "--spin"]))
    assert options == {"providers": ["cpu"], "spin": True, "threads": 3}
    with DefectSynthesizer.from_bundle(toy_bundle, **options) as synth:
        session_options = synth.backend.sessions["step"].get_session_options()
        assert session_options.intra_op_num_threads == 3
        assert session_options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(OptionError, match="--spin sets onnxruntime's thread pools; it does not apply to --backend"):
        backend_options(parser.parse_args(["--backend", "torch", "--spin"]))

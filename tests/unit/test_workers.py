"""The workers' master (gateway/workers.py), its parts that need no fork: the metrics
directory set up before prometheus_client is imported, a port someone listens on
refused, the CPUs counted. Forking and supervising: tests/integration/test_workers.py."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from gateway import workers


def test_the_metrics_directory_cannot_be_chosen_after_prometheus_client_is_imported() -> None:
    import prometheus_client  # noqa: F401 (as the gateway has by now)

    with pytest.raises(RuntimeError, match="imported before the multiprocess setup"):
        workers.prepare_multiproc(None)


def test_a_given_metrics_directory_is_emptied_of_old_series_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "prometheus_client")  # as in the master, before import
    monkeypatch.setenv(workers.ENV_MULTIPROC, "unset")
    (tmp_path / "counter_1.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("kept")
    path, created = workers.prepare_multiproc(str(tmp_path))
    assert (path, created) == (str(tmp_path), False)
    assert os.environ[workers.ENV_MULTIPROC] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    workers.cleanup(path, created)
    assert tmp_path.exists()  # not ours to remove


def test_a_directory_made_for_the_metrics_is_removed_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "prometheus_client")
    monkeypatch.setenv(workers.ENV_MULTIPROC, "unset")
    path, created = workers.prepare_multiproc(None)
    assert created and Path(path).is_dir()
    workers.cleanup(path, created)
    assert not Path(path).exists()


def test_a_port_another_process_listens_on_is_refused_by_name() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port}: .*another smtp-gateway"):
            workers.ensure_free([("127.0.0.1", port)])
    workers.ensure_free([("127.0.0.1", port), ("127.0.0.1", 0)])  # free now; 0 is skipped


def test_the_cpus_counted_are_at_least_one_and_at_most_the_affinity() -> None:
    assert 1 <= workers.available_cpus() <= len(os.sched_getaffinity(0))

"""The CLI surface: `arforge ui` binds to 127.0.0.1 on the embedded store."""

from __future__ import annotations

import pytest

import subprocess

from arforge import cli, tracking

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels


def test_ui_binds_loopback_on_embedded_store(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: calls.append((cmd, env)) or 0)
    assert cli.main(["ui", "--port", "5123"]) == 0
    cmd, env = calls[0]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == tracking.tracking_uri()
    assert tracking.tracking_uri().startswith("sqlite:///") and tracking.tracking_uri().endswith("mlflow.db")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "http://127.0.0.1:5123" in capsys.readouterr().out


def test_plugins_unknown_kind(capsys):
    assert cli.main(["plugins", "--kind", "quantizer"]) == 2
    assert "unknown kind 'quantizer'" in capsys.readouterr().err

"""install.sh --fastagi: the hardened systemd unit of npl-agi serve, with the installation's paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def install(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        ["bash", str(ROOT / "install.sh"), *args, "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_fastagi_unit_is_installed_with_this_installations_paths_and_removed_again(tmp_path) -> None:
    stage = tmp_path / "stage"
    prefix = stage / "opt/npl-agi"
    done = install("--fastagi", "--destdir", str(stage), "--prefix", str(prefix))
    assert done.returncode == 0, done.stdout + done.stderr
    unit = (stage / "etc/systemd/system/npl-agi-fastagi.service").read_text()
    assert f"ExecStart={prefix}/bin/npl-agi serve --config /etc/asterisk/npl-agi.conf\n" in unit
    assert "@" not in unit.replace("@PREFIX@", "")  # every placeholder filled
    for line in (
        "User=asterisk",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LimitNOFILE=65536",
    ):
        assert f"\n{line}\n" in unit
    assert "\nReadWritePaths=/var/lib/asterisk/npl-agi -/tmp\n" in unit
    assert "NPL_FASTAGI=agi://127.0.0.1:4573" in done.stdout
    serve = subprocess.run([str(prefix / "bin/npl-agi"), "serve", "--help"], capture_output=True, text=True)
    assert serve.returncode == 0 and "--listen" in serve.stdout
    gone = install("--uninstall", "--fastagi", "--destdir", str(stage), "--prefix", str(prefix))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not (stage / "etc/systemd/system/npl-agi-fastagi.service").exists()

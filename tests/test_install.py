"""install.sh, run for real into staging directories (``--destdir``), as an admin or packager would.

Creating a virtual environment and installing the package into it takes seconds, so one staged
installation is shared by the module; tests that change it put it back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SH = ROOT / "install.sh"
SNIPPETS = ("npl-lookup.conf", "npl-outbound.conf", "npl-routes.conf", "npl-cdr-custom.conf")
STAND_IN_UID = STAND_IN_GID = 4321  # the asterisk user and group, on a machine that has none
AGI_REPLIES = "200 result=1\n" * 40


def install_command(*args: str | Path, script: Path = INSTALL_SH) -> tuple[list[str], dict[str, str]]:
    """install.sh's command line and environment, as an admin would run it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return ["bash", str(script), *map(str, args)], env


def run_install(*args: str | Path, cwd: Path | None = None, script: Path = INSTALL_SH) -> CompletedProcess[str]:
    """Run install.sh (this checkout's by default) and wait for it."""
    command, env = install_command(*args, script=script)
    return subprocess.run(command, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=300)


def ok(result: CompletedProcess[str]) -> str:
    """The output of a run that must have succeeded (its output in the failure message)."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@dataclass
class Stage:
    """An installation staged to work in place, in a PBX's own layout: ``--destdir D`` with
    ``--prefix``, ``--conf-dir``, ``--agi-dir`` and ``--cache-dir`` all under D."""

    root: Path
    first_output: str

    @property
    def prefix(self) -> Path:
        return self.root / "opt" / "npl-agi"

    @property
    def agi(self) -> Path:
        return self.root / "usr" / "share" / "pbx" / "agi-bin" / "npl-lookup.agi"

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc" / "pbx"

    @property
    def cache_dir(self) -> Path:
        return self.root / "srv" / "npl-cache"

    def args(self) -> list[str]:
        return [
            *("--destdir", str(self.root), "--prefix", str(self.prefix), "--python", sys.executable),
            *("--conf-dir", str(self.conf_dir), "--agi-dir", str(self.agi.parent), "--cache-dir", str(self.cache_dir)),
        ]

    def installed_config(self) -> str:
        """The example configuration as this stage installs it: the cache in its --cache-dir."""
        sample = (ROOT / "npl-agi.conf.sample").read_text()
        default = "path = /var/lib/asterisk/npl-agi/cache.sqlite\n"
        assert sample.count(default) == 1
        return sample.replace(default, f"path = {self.cache_dir / 'cache.sqlite'}\n")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Content and mode of every file under root, except the package's own site-packages."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if "/lib/python" in f"/{rel}" or "__pycache__" in rel or path.is_symlink() or not path.is_file():
            continue
        files[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode & 0o7777)
    return files


def copy_source_tree(dest: Path) -> Path:
    """The repository's files as they are now, without build products or environments."""
    skip = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


@dataclass
class Background:
    """install.sh from its own copy of the source tree, running while other installs run."""

    top: Path
    tree: Path
    process: subprocess.Popen[str]

    def result(self) -> CompletedProcess[str]:
        out, err = self.process.communicate(timeout=300)
        return CompletedProcess(self.process.args, self.process.returncode, out, err)


def start_in_background(top: Path, *args: str | Path) -> Background:
    """Each run builds from its own tree: pip builds in the source directory."""
    tree = copy_source_tree(top / "npl-agi")
    command, env = install_command(*args, "--python", sys.executable, script=tree / "install.sh")
    process = subprocess.Popen(command, cwd=top, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Background(top, tree, process)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Background]:
    """``install.sh --demo``, started with the stage's install (virtual environments take CPU time)."""
    run = start_in_background(tmp_path_factory.mktemp("demo"), "--demo")
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.communicate()


@pytest.fixture(scope="module")
def packager(tmp_path_factory) -> Iterator[Background]:
    """A packager's stage: default paths under --destdir, started with the stage's install."""
    top = tmp_path_factory.mktemp("packager")
    run = start_in_background(top, "--destdir", top / "pkg")
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.communicate()


@pytest.fixture(scope="module")
def stage(demo, packager) -> Iterator[Stage]:
    """One in-place staged installation for the module, in a directory every user can enter
    (an unprivileged user runs its AGI script too)."""
    root = Path(tempfile.mkdtemp(prefix="npl-agi-stage-"))
    root.chmod(0o755)
    s = Stage(root, "")
    try:
        s.first_output = ok(run_install(*s.args()))
        yield s
    finally:
        shutil.rmtree(root)


def test_help_and_bad_usage() -> None:
    result = run_install("--help")
    out = ok(result)
    for option in ("--prefix", "--destdir", "--agi-dir", "--conf-dir", "--uninstall", "--purge", "--dry-run", "--demo"):
        assert option in out
    bad = run_install("--no-such-option")
    assert bad.returncode == 2
    assert "--no-such-option" in bad.stderr
    assert run_install("--prefix").returncode == 2
    assert run_install("--purge").returncode == 2  # only with --uninstall


def test_shell_script_is_clean() -> None:
    """shellcheck when it is installed (CI installs it); bash's own syntax check always."""
    assert subprocess.run(["bash", "-n", str(INSTALL_SH)], capture_output=True).returncode == 0
    assert INSTALL_SH.read_text().splitlines()[1:].count("set -euo pipefail") == 1
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        print("shellcheck is not installed: only bash -n was run (apt-get install shellcheck)")
        return
    result = subprocess.run([shellcheck, str(INSTALL_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_stage_holds_every_file(stage: Stage) -> None:
    for name in SNIPPETS:
        assert (stage.conf_dir / name).read_bytes() == (ROOT / "dialplan" / name).read_bytes()
    config = stage.conf_dir / "npl-agi.conf"
    assert config.read_text() == stage.installed_config()
    assert config.stat().st_mode & 0o777 == 0o640  # it holds the account password
    assert stage.cache_dir.is_dir()
    assert stage.cache_dir.stat().st_mode & 0o7777 == 0o2770  # setgid: its files take its group
    assert os.access(stage.agi, os.X_OK)
    assert (stage.prefix / "bin" / "npl-agi").exists()
    assert f"staged under {stage.root}" in stage.first_output
    # Nothing is written outside the stage: every path the run reported lies under it.
    reported = [w for line in stage.first_output.splitlines() for w in line.split() if w.startswith("/")]
    assert reported
    assert all(w.startswith(str(stage.root)) for w in reported), reported


def test_staged_agi_is_the_real_script_on_the_staged_python(stage: Stage) -> None:
    shebang, *body = stage.agi.read_text().splitlines(keepends=True)
    assert body == (ROOT / "agi-bin" / "npl-lookup.agi").read_text().splitlines(keepends=True)[1:]
    interpreter = Path(shebang[2:].strip())
    assert interpreter.parent == stage.prefix / "bin"
    assert interpreter.name.startswith("python")
    assert os.access(interpreter, os.X_OK)


def test_staged_agi_runs_a_lookup(stage: Stage, sim, config_file) -> None:
    """Asterisk's side of a process AGI over pipes: environment block, then one reply a command."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the stage's own package
    env["NPL_AGI_CONFIG"] = str(config_file)
    header = (
        "agi_request: npl-lookup.agi\nagi_channel: Local/07788450450@npl-outbound-00000001;2\n"
        "agi_context: npl-lookup\nagi_extension: s\nagi_priority: 13\nagi_arg_1: 07788450450\n\n"
    )
    result = subprocess.run(
        [str(stage.agi), "07788450450"],
        input=header + AGI_REPLIES,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'SET VARIABLE "NPL_MCCMNC" "23415"' in lines, result.stdout
    assert 'SET VARIABLE "NPL_ERR" ""' in lines
    assert sim.stats()["charged"] == ["447788450450"]


def test_installed_demo_finds_the_bundled_routes(stage: Stage, tmp_path: Path) -> None:
    """Installed without its source tree, the package still ships npl-routes.conf for the demo."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the stage's own package
    probe = (
        "from npl_agi.doubles.demo import find_file, read_routes; "
        "print(read_routes(find_file('dialplan', 'npl-routes.conf')))"
    )
    result = subprocess.run(
        [str(stage.prefix / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "'23415': 'npl-routes: Dial(PJSIP/${NPL_DIAL}@trunk-vodafone,60)'" in result.stdout


def test_rerun_changes_nothing(stage: Stage) -> None:
    before = snapshot(stage.root)
    out = ok(run_install(*stage.args()))
    assert snapshot(stage.root) == before
    assert not list(stage.root.rglob("*.new"))
    for path in (*(stage.conf_dir / n for n in (*SNIPPETS, "npl-agi.conf")), stage.agi, stage.cache_dir):
        assert f"npl-agi: unchanged {path}\n" in out


def test_edited_config_and_routes_survive_a_rerun(stage: Stage, tmp_path: Path) -> None:
    """Edited files stay. FILE.new appears only when the shipped version changed, and once."""
    config = stage.conf_dir / "npl-agi.conf"
    routes = stage.conf_dir / "npl-routes.conf"
    pristine = {p: p.read_text() for p in (config, routes)}
    edited = {
        config: pristine[config].replace("user =\n", "user = acme\n"),
        routes: pristine[routes] + "\n; Sky Mobile\nexten => 23457,1,Dial(PJSIP/${NPL_DIAL}@trunk-sky,60)\n",
    }
    assert edited[config] != pristine[config]
    try:
        for path, text in edited.items():
            path.write_text(text)
        out = ok(run_install(*stage.args()))
        for path, text in edited.items():
            assert path.read_text() == text
            assert not path.with_name(path.name + ".new").exists()
            assert f"your edited {path} stays (the shipped version has not changed)\n" in out

        # A newer version ships other routes and another sample: now each gets its .new.
        newer = copy_source_tree(tmp_path / "newer")
        for name in ("dialplan/npl-routes.conf", "npl-agi.conf.sample"):
            (newer / name).write_text((newer / name).read_text() + "; changed in a newer version\n")
        out = ok(run_install(*stage.args(), script=newer / "install.sh"))
        for path, text in edited.items():
            assert path.read_text() == text
            new = path.with_name(path.name + ".new")
            assert new.read_text().endswith("; changed in a newer version\n")
            assert f"{new}: compare and merge" in out
        assert (stage.conf_dir / "npl-agi.conf.new").stat().st_mode & 0o777 == 0o640
        assert not (stage.conf_dir / "npl-lookup.conf.new").exists()  # unedited snippets are not touched
        # Merged by the admin and deleted: rerunning that version does not bring them back.
        for path in edited:
            path.with_name(path.name + ".new").unlink()
        after = snapshot(stage.root)
        ok(run_install(*stage.args(), script=newer / "install.sh"))
        assert snapshot(stage.root) == after
    finally:
        for path, text in pristine.items():
            path.write_text(text)
            path.with_name(path.name + ".new").unlink(missing_ok=True)
        ok(run_install(*stage.args()))  # this version again, for the tests that follow


def test_dry_run_writes_nothing(stage: Stage, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    out = ok(
        run_install("--dry-run", "--destdir", fresh, "--prefix", fresh / "opt" / "npl-agi", "--python", sys.executable)
    )
    assert not fresh.exists()
    assert "would run:" in out and "-m venv" in out
    before = snapshot(stage.root)
    out = ok(run_install("--dry-run", "--uninstall", *stage.args()))
    assert snapshot(stage.root) == before
    assert f"rm -f -- {stage.agi}" in out


def test_machine_without_asterisk_is_told_and_still_gets_the_package(tmp_path: Path) -> None:
    """No --destdir (a real install) and no asterisk command: a note, then the usual steps.
    Dry run with every path that has an option in tmp_path, so nothing outside it is at risk."""
    command, env = install_command(
        "--dry-run",
        "--python",
        sys.executable,
        *("--prefix", tmp_path / "opt", "--agi-dir", tmp_path / "agi", "--conf-dir", tmp_path / "etc"),
    )
    bin_dir = tmp_path / "bin"  # a PATH with the tools install.sh uses, and no asterisk
    bin_dir.mkdir()
    for tool in (
        "bash",
        "id",
        "sha256sum",
        "cut",
        "awk",
        "dirname",
        "cmp",
        "ls",
        "getent",
        "head",
        "env",
        "mktemp",
        "rm",
    ):
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    result = subprocess.run(command, env={**env, "PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)
    out = ok(result)
    told = "Asterisk is not installed on this machine" in out
    assert told == (not Path("/usr/sbin/asterisk").exists())
    assert "-m pip install" in out
    for path in (tmp_path / "agi/npl-lookup.agi", tmp_path / "etc/npl-agi.conf", tmp_path / "etc/npl-routes.conf"):
        assert f" {path}\n" in out  # --agi-dir and --conf-dir are where files would go
    assert list(tmp_path.iterdir()) == [bin_dir]


def test_demo_on_a_machine_without_python3_venv(tmp_path: Path) -> None:
    """A fresh Debian: as root --demo installs python3-venv first; otherwise it says how."""
    bin_dir = tmp_path / "bin"  # bash and apt-get, but no python3
    bin_dir.mkdir()
    for tool in ("bash", "id", "env", "dirname", "apt-get"):
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    source = tmp_path / "src"  # a source tree without a ./.venv, whatever this checkout has
    source.mkdir()
    for name in ("install.sh", "pyproject.toml"):
        shutil.copy(ROOT / name, source / name)
    command, env = install_command("--demo", "--dry-run", script=source / "install.sh")
    result = subprocess.run(command, env={**env, "PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)
    if (bin_dir / "apt-get").exists() and os.geteuid() == 0:
        out = ok(result)
        assert "would run: env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv" in out
        assert "would run: python3 -m venv" in out
        assert out.rstrip().endswith("npl-agi demo")
    else:
        assert result.returncode == 1
        assert "apt-get install python3-venv" in result.stderr


def test_packager_stage_names_final_paths_and_uninstalls(packager: Background) -> None:
    """Default paths under --destdir: files are staged, scripts name /opt/npl-agi (their final home)."""
    root = packager.top / "pkg"
    script = packager.tree / "install.sh"
    ok(packager.result())
    agi = root / "var/lib/asterisk/agi-bin/npl-lookup.agi"
    assert agi.read_text().splitlines()[0].startswith("#!/opt/npl-agi/bin/python")
    assert (root / "opt/npl-agi/bin/npl-agi").read_text().startswith("#!/opt/npl-agi/bin/python")
    assert str(root) not in (root / "opt/npl-agi/bin/activate").read_text()
    assert (root / "etc/asterisk/npl-agi.conf").exists()
    assert (root / "var/lib/asterisk/npl-agi").is_dir()

    # The installed programs find the configuration at its final path, with no environment variable.
    assert (root / "opt/npl-agi/share/npl-agi/config-path").read_text() == "/etc/asterisk/npl-agi.conf\n"
    assert (root / "etc/asterisk/npl-agi.conf").read_bytes() == (packager.tree / "npl-agi.conf.sample").read_bytes()

    # A rerun still works with the relocated scripts (pip is run through bin/python).
    config = root / "etc/asterisk/npl-agi.conf"
    config.write_text(config.read_text().replace("password =\n", "password = secret\n"))
    ok(run_install("--destdir", root, "--python", sys.executable, script=script))
    assert not (root / "etc/asterisk/npl-agi.conf.new").exists()  # nothing new was shipped

    out = ok(run_install("--uninstall", "--destdir", root, script=script))
    assert not agi.exists()
    assert not (root / "opt/npl-agi").exists()
    assert not (root / "var/lib/asterisk/npl-agi").exists()
    for name in SNIPPETS:
        assert not (root / "etc/asterisk" / name).exists()
    assert "password = secret" in config.read_text()  # an edited config stays
    assert "--purge" in out

    # Installed again over the edited file that stayed: still no needless .new.
    out = ok(run_install("--destdir", root, "--python", sys.executable, script=script))
    assert not (root / "etc/asterisk/npl-agi.conf.new").exists(), out
    assert "password = secret" in config.read_text()

    ok(run_install("--uninstall", "--purge", "--destdir", root, script=script))
    assert not config.exists()
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_demo_creates_dot_venv_and_passes_on_the_demo_status(demo: Background, tmp_path: Path) -> None:
    result = demo.result()
    tree = demo.tree
    venv = tree / ".venv"
    for tool in ("npl-agi", "pytest", "asterisklint"):  # the package and its test extras
        assert (venv / "bin" / tool).exists(), tool
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import npl_agi; print(npl_agi.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert located.stdout.strip() == str(tree / "npl_agi" / "__init__.py")  # editable
    direct = subprocess.run([str(venv / "bin" / "npl-agi"), "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == direct.returncode, result.stdout + result.stderr
    # After its own lines, install.sh's output is the demo's: as many lines, the same first word.
    _, marker, demo_output = result.stdout.partition("npl-agi: running .venv/bin/npl-agi demo\n")
    assert marker, result.stdout
    assert len(demo_output.splitlines()) == len(direct.stdout.splitlines())
    assert [line.split()[:1] for line in demo_output.splitlines()] == [
        line.split()[:1] for line in direct.stdout.splitlines()
    ]


def agi_lookup(stage: Stage, number: str, prefix: list[str] | None = None) -> dict[str, str]:
    """The installed AGI script over pipes, without $NPL_AGI_CONFIG: the variables it set."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NPL_AGI_CONFIG")}
    header = f"agi_request: npl-lookup.agi\nagi_extension: s\nagi_arg_1: {number}\n\n"
    result = subprocess.run(
        [*(prefix or []), str(stage.agi), number],
        input=header + AGI_REPLIES,
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith("SET VARIABLE "):
            name, value = line[len("SET VARIABLE ") :].split(" ", 1)
            found[name.strip('"')] = value.strip('"')
    return found


@pytest.fixture
def live_stage(stage: Stage, sim) -> Iterator[Stage]:
    """The stage's own npl-agi.conf pointed at the simulator, as an admin edits it."""
    config = stage.conf_dir / "npl-agi.conf"
    pristine = config.read_text()
    config.write_text(
        pristine.replace("url = https://secure.comcetera.com/npl\n", f"url = {sim.url}\n")
        .replace("user =\n", "user = demo\n")
        .replace("password =\n", "password = demo\n")
    )
    try:
        yield stage
    finally:
        config.write_text(pristine)
        for leftover in stage.cache_dir.iterdir():
            leftover.unlink()


def test_installed_programs_read_the_installed_configuration(live_stage: Stage, sim) -> None:
    """--conf-dir anywhere: the script and the command find the file without $NPL_AGI_CONFIG."""
    seen = agi_lookup(live_stage, "07788450450")
    assert (seen["NPL_ERR"], seen["NPL_MCCMNC"], seen["NPL_SOURCE"]) == ("", "23415", "api")
    assert sim.stats()["charged"] == ["447788450450"]
    assert (live_stage.cache_dir / "cache.sqlite").exists()  # the --cache-dir written into the config
    assert [p.name.startswith("npl-agi-") for p in live_stage.cache_dir.glob("*.lock")] == [True]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NPL_AGI_CONFIG")}
    npl_agi = str(live_stage.prefix / "bin" / "npl-agi")
    version = subprocess.run([npl_agi, "--version"], env=env, capture_output=True, text=True, timeout=60)
    config = live_stage.conf_dir / "npl-agi.conf"
    assert version.stdout.splitlines()[1].startswith(f"configuration: {config} (recorded by install.sh in ")
    check = subprocess.run([npl_agi, "check"], env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[0].startswith(f"configuration: {config} ")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_lookup_as_root_then_a_cache_hit_for_the_asterisk_user(live_stage: Stage, sim) -> None:
    """An admin's ``npl-agi lookup`` as root creates the cache; Asterisk's AGI (an unprivileged
    user of the cache's group) then reads and writes it: the second lookup is a hit."""
    config = live_stage.conf_dir / "npl-agi.conf"
    os.chown(config, 0, STAND_IN_GID)  # what install.sh does with the group asterisk
    os.chown(live_stage.cache_dir, 0, STAND_IN_GID)
    live_stage.cache_dir.chmod(0o2770)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NPL_AGI_CONFIG")}
    npl_agi = str(live_stage.prefix / "bin" / "npl-agi")
    first = subprocess.run([npl_agi, "lookup", "07788450450"], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and first.stdout.startswith("447788450450 23415 "), first.stderr
    cache = live_stage.cache_dir / "cache.sqlite"
    assert (cache.stat().st_gid, cache.stat().st_mode & 0o777) == (STAND_IN_GID, 0o660)

    as_asterisk = ["setpriv", f"--reuid={STAND_IN_UID}", f"--regid={STAND_IN_GID}", "--clear-groups", "--"]
    seen = agi_lookup(live_stage, "07788450450", prefix=as_asterisk)
    assert (seen["NPL_ERR"], seen["NPL_MCCMNC"], seen["NPL_SOURCE"]) == ("", "23415", "cache")
    fresh = agi_lookup(live_stage, "07973100100", prefix=as_asterisk)  # and it can write there too
    assert (fresh["NPL_ERR"], fresh["NPL_SOURCE"]) == ("ERR1", "api")
    assert agi_lookup(live_stage, "07973100100", prefix=as_asterisk)["NPL_SOURCE"] == "cache"
    assert sim.stats()["charged"] == ["447788450450", "447973100100"]

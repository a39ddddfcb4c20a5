"""The measured launch (sgmonitor.tee.boot): what the enclave runs is what MRENCLAVE covers.

Every test boots a real interpreter on a copy of the source tree. Where a test claims a
defence, it first shows the attack working on an ordinary ``python`` import of that tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import py_compile
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import sgmonitor
from sgmonitor.tee import boot

REPO = Path(sgmonitor.__file__).resolve().parent.parent
EXT_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
# Code that leaves a PWNED file ``up`` directories above the module running it.
MARKER_CODE = "\nimport pathlib as _p\n_p.Path(__file__).parents[{up}].joinpath('PWNED').touch()\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's package tree, free to modify."""
    root = tmp_path / "tree"
    shutil.copytree(
        REPO / "sgmonitor", root / "sgmonitor", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_boot(
    root: Path,
    extra: list[str],
    *,
    env: dict[str, str] | None = None,
    site_first: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The measured launch of ``root`` as the host starts it (optionally with a site
    directory before the interpreter's own, or another environment)."""
    argv = boot.enclave_argv(root=root, extra=extra)
    if site_first is not None:
        at = argv.index("--root")
        argv[at:at] = ["--site", str(site_first)]
    return subprocess.run(
        argv,
        env=boot.clean_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def measure(root: Path, *, site_first: Path | None = None) -> tuple[str, str]:
    """(MRENCLAVE hex, manifest) from ``--measure-only``."""
    proc = run_boot(root, ["--measure-only"], site_first=site_first)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc["mrenclave"], doc["manifest"]


def normal_python(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` from ``root`` with ordinary imports: what the boot replaces."""
    return subprocess.run(
        [sys.executable, "-B", "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )


def pwned(root: Path) -> bool:
    return (root / "PWNED").exists()


def extension_module() -> Path:
    """A real extension module of this interpreter, to plant under another name."""
    spec = importlib.util.find_spec("_json")
    assert spec is not None and spec.origin is not None and spec.origin.endswith(EXT_SUFFIX)
    return Path(spec.origin)


# --- the measurement -----------------------------------------------------------------


def test_measurement_is_stable_path_independent_and_lists_every_source(tree: Path) -> None:
    first = boot.measure_installed(root=tree)
    assert boot.measure_installed(root=tree) == first
    assert boot.measure_installed(root=REPO).mrenclave == first.mrenclave
    assert len(first.mrenclave) == 32
    assert first.mrenclave == hashlib.sha256(first.manifest.encode()).digest()
    manifest = first.manifest
    assert str(tree) not in manifest and str(REPO) not in manifest
    sources = [
        p
        for src in boot.ENCLAVE_SOURCES
        for p in ([tree / src] if src.endswith(".py") else (tree / src).rglob("*.py"))
    ]
    assert len(sources) > 20
    for p in sources:
        assert f"file {p.relative_to(tree).as_posix()} {sha(p.read_bytes())}\n" in manifest
    assert manifest.count("\nfile ") == len(sources)
    assert f"boot {sha((tree / boot.BOOT_RELPATH).read_bytes())}\n" in manifest


def test_one_changed_source_line_changes_mrenclave(tree: Path) -> None:
    before = boot.measure_installed(root=tree)
    path = tree / "sgmonitor/ids/pslist.py"
    path.write_text(path.read_text().replace("\n", "\n# one line more\n", 1))
    after = boot.measure_installed(root=tree)
    assert after.mrenclave != before.mrenclave
    changed = set(after.manifest.splitlines()) ^ set(before.manifest.splitlines())
    assert {line.split()[1] for line in changed} == {"sgmonitor/ids/pslist.py"}


def test_the_interpreter_and_library_modules_are_measured_by_their_bytes() -> None:
    import cryptography
    from cryptography.hazmat.bindings import _rust

    manifest = boot.measure_installed().manifest
    exe = Path(sys.executable).resolve()
    version = " ".join(sys.version.split())
    interpreter = f"interpreter {version} {sys.implementation.cache_tag} {sha(exe.read_bytes())}"
    assert f"{interpreter}\n" in manifest
    # cryptography's Python code and its Rust extension, by the hashes of this version
    assert f"module cryptography {sha(Path(cryptography.__file__).read_bytes())}\n" in manifest
    assert f"module {_rust.__name__} {sha(Path(_rust.__file__).read_bytes())}\n" in manifest
    assert f"module json {sha(Path(json.__file__).read_bytes())}\n" in manifest


def test_the_enclave_measures_only_its_wire_families() -> None:
    """The enclave frames its sealed exchange and its calls; opening hypervisor
    sessions, the attestation and monitor links and the admin socket are the library's
    and the services': their code is not in the measured enclave (issue 10)."""
    manifest = boot.measure_installed().manifest
    wire = sorted(line.split()[1] for line in manifest.splitlines() if "sgmonitor/wire" in line)
    assert wire == [f"sgmonitor/wire/{name}.py" for name in ("__init__", "calls", "core", "sealed")]


def test_another_library_version_changes_mrenclave(tree: Path, tmp_path: Path) -> None:
    import cryptography

    before, _ = measure(tree)
    site = tmp_path / "site"
    shutil.copytree(
        Path(cryptography.__file__).parent,
        site / "cryptography",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    about = site / "cryptography/__about__.py"  # as another release would differ
    about.write_text(about.read_text() + "# a release later\n")
    after, manifest = measure(tree, site_first=site)
    assert after != before
    assert f"module cryptography.__about__ {sha(about.read_bytes())}\n" in manifest


def test_a_bytecode_only_library_module_is_refused(tree: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (tmp_path / "evil.py").write_text(MARKER_CODE.format(up=0))
    py_compile.compile(str(tmp_path / "evil.py"), cfile=str(site / "_cffi_backend.pyc"))
    shown = subprocess.run(
        [sys.executable, "-c", "import _cffi_backend"],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        timeout=60,
    )
    assert shown.returncode == 0 and pwned(site), "an ordinary import runs a lone .pyc"
    (site / "PWNED").unlink()

    proc = run_boot(tree, ["--measure-only"], site_first=site)
    assert proc.returncode != 0
    assert "_cffi_backend: only bytecode at" in proc.stderr
    assert not pwned(site)


# --- what cannot change what runs ------------------------------------------------------


def plant_pyc(source: Path, evil_source: str, scratch: Path) -> None:
    """A .pyc compiled from ``evil_source`` posing as ``source``'s cache: the genuine
    file's mtime and size in its header, so an ordinary import trusts it."""
    scratch.write_text(evil_source)
    cfile = Path(importlib.util.cache_from_source(str(source)))
    cfile.parent.mkdir(exist_ok=True)
    py_compile.compile(str(scratch), cfile=str(cfile), doraise=True)
    st = source.stat()
    header = (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
    header += (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    data = cfile.read_bytes()
    cfile.write_bytes(data[:8] + header + data[16:])


def test_a_planted_pyc_runs_on_normal_import_but_not_in_the_enclave(
    tree: Path, tmp_path: Path
) -> None:
    genuine, _ = measure(tree)
    source = tree / "sgmonitor/errors.py"
    plant_pyc(source, source.read_text() + MARKER_CODE.format(up=1), tmp_path / "evil.py")
    assert normal_python(tree, "import sgmonitor.errors").returncode == 0
    assert pwned(tree), "an ordinary import should have run the planted .pyc"
    (tree / "PWNED").unlink()

    assert measure(tree)[0] == genuine
    assert not pwned(tree)


def test_planted_extension_and_bytecode_files_have_no_effect_but_a_stray_source_does(
    tree: Path,
) -> None:
    genuine, _ = measure(tree)
    shutil.copy(extension_module(), tree / f"sgmonitor/errors{EXT_SUFFIX}")
    shutil.copy(extension_module(), tree / f"sgmonitor/tee/native{EXT_SUFFIX}")
    legacy = tree / "sgmonitor/kernel/legacy.pyc"
    py_compile.compile(str(tree / "sgmonitor/errors.py"), cfile=str(legacy), doraise=True)
    failed = normal_python(tree, "import sgmonitor.errors")
    assert "PyInit_errors" in failed.stderr, "an ordinary import loads the .so first"
    assert normal_python(tree, "import sgmonitor.kernel.legacy").returncode == 0

    assert measure(tree)[0] == genuine

    stray = tree / "sgmonitor/tee/stray.py"
    stray.write_text("X = 1\n")
    mrenclave, manifest = measure(tree)
    assert mrenclave != genuine
    assert f"file sgmonitor/tee/stray.py {sha(stray.read_bytes())}\n" in manifest


def test_the_host_environment_does_not_reach_the_enclave(tree: Path, tmp_path: Path) -> None:
    assert not any(k.startswith("PYTHON") for k in boot.clean_env())
    genuine, _ = measure(tree)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "json.py").write_text(MARKER_CODE.format(up=0))
    (evil / "startup.py").write_text(MARKER_CODE.format(up=0))
    hostile = {
        **boot.clean_env(),
        "PYTHONPATH": str(evil),
        "PYTHONSTARTUP": str(evil / "startup.py"),
        "PYTHONINSPECT": "1",
        "PYTHONOPTIMIZE": "2",
    }
    shown = subprocess.run(
        [sys.executable, "-c", "import json"],
        env=hostile,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert shown.returncode == 0
    assert pwned(evil), "PYTHONPATH should reach an ordinary interpreter"
    (evil / "PWNED").unlink()

    proc = run_boot(tree, ["--measure-only"], env=hostile)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["mrenclave"] == genuine
    assert ">>>" not in proc.stderr  # no interactive prompt after the boot (PYTHONINSPECT)
    assert not pwned(evil)


def test_a_launch_other_than_the_stub_is_refused(tree: Path) -> None:
    argv = boot.enclave_argv(root=tree, extra=["--measure-only"])
    argv.insert(1, "-O")  # strips asserts: not the interpreter that was measured
    proc = subprocess.run(argv, env=boot.clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not started by boot.STUB" in proc.stderr


def test_odd_source_trees_are_refused_with_a_reason(tree: Path) -> None:
    (tree / "sgmonitor/kernel/bad name.py").write_text("")
    with pytest.raises(boot.BootError, match="not a module name"):
        boot.measure_installed(root=tree)
    (tree / "sgmonitor/kernel/bad name.py").unlink()
    os.symlink("../errors.py", tree / "sgmonitor/tee/link.py")
    with pytest.raises(boot.BootError, match="symlink"):
        boot.measure_installed(root=tree)
    (tree / "sgmonitor/tee/link.py").unlink()
    (tree / "sgmonitor/enclave/__main__.py").unlink()
    with pytest.raises(boot.BootError, match="no enclave entry point"):
        boot.measure_installed(root=tree)


def test_the_command_line_names_the_interpreters_site_packages() -> None:
    argv = boot.enclave_argv(root=REPO, extra=["--x"])
    assert argv[1:6] == ["-I", "-B", "-S", "-c", boot.STUB]
    assert argv[6] == str(REPO / boot.BOOT_RELPATH)
    site = [argv[i + 1] for i, a in enumerate(argv) if a == "--site"]
    assert sysconfig.get_paths()["purelib"] in site
    assert argv[-1] == "--x"


# --- a booted enclave process ----------------------------------------------------------

PROBE_MAIN = '''\
"""A probe standing in for the enclave's main, to ask the booted process questions."""
import importlib
import os
import sys

import sgmonitor.enclave.program


def try_import(name):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "imported"


BEFORE_SEAL = [try_import(n) for n in ("sgmonitor.kernel.legacy", "sgmonitor.tee.native")]


def main(argv, *, mrenclave):
    print("ready", mrenclave.hex(), BEFORE_SEAL, flush=True)
    for line in sys.stdin:
        what, arg = line.split()
        if what == "import":
            print(try_import(arg), flush=True)
        elif what == "call":
            print(sgmonitor.enclave.program.for_host(arg), flush=True)
        elif what == "extension":
            import fcntl

            path = sys.modules[arg].__file__
            seals = fcntl.fcntl(int(path.rpartition("/")[2]), fcntl.F_GET_SEALS)
            print(path, os.readlink(path), seals, sep="|", flush=True)
    return 0
'''


class Probe:
    """A booted process running :data:`PROBE_MAIN`, one question per line."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            boot.enclave_argv(root=root, extra=[]),
            env=boot.clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.ready = self.stdout.readline()
        assert self.ready.startswith("ready"), "the probe did not boot (see stderr)"

    def ask(self, question: str) -> str:
        self.stdin.write(question + "\n")
        self.stdin.flush()
        return self.stdout.readline().strip()

    def close(self) -> None:
        self.stdin.close()
        assert self.proc.wait(30) == 0


def test_a_booted_enclave_runs_only_what_it_measured(tree: Path) -> None:
    (tree / "sgmonitor/enclave/__main__.py").write_text(PROBE_MAIN)
    shutil.copy(extension_module(), tree / f"sgmonitor/tee/native{EXT_SUFFIX}")
    legacy = tree / "sgmonitor/kernel/legacy.pyc"
    py_compile.compile(str(tree / "sgmonitor/errors.py"), cfile=str(legacy), doraise=True)
    probe = Probe(tree)
    try:
        # Before the seal: sgmonitor modules come only from the measured sources.
        for name in ("sgmonitor.kernel.legacy", "sgmonitor.tee.native"):
            assert f"ModuleNotFoundError: {name} is not among the measured" in probe.ready
        # Extension modules run from a sealed in-memory copy of the bytes measured.
        answer = probe.ask("extension cryptography.hazmat.bindings._rust")
        path, target, seals = answer.split("|")
        assert path.startswith("/proc/self/fd/") and target.startswith("/memfd:")
        wanted = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        assert int(seals) & wanted == wanted
        assert probe.ask("extension fcntl").split("|")[2] == seals

        # After the seal: the tree on disk no longer matters, nothing new can be imported.
        shutil.rmtree(tree / "sgmonitor")
        (tree / "sgmonitor/kernel").mkdir(parents=True)
        (tree / "sgmonitor/__init__.py").write_text(MARKER_CODE.format(up=1))
        (tree / "sgmonitor/kernel/late.py").write_text(MARKER_CODE.format(up=2))
        assert probe.ask("call 0xdeadbeef") == "#"
        unmeasured = ("sgmonitor.kernel.late", "wave", "json.tool", "cryptography.x509", "lz4")
        for name in unmeasured:
            assert probe.ask(f"import {name}") == (
                f"ImportError: module {name!r} was not measured at launch"
            )
        assert probe.ask("import sgmonitor.enclave.program") == "imported"  # already loaded
        assert not pwned(tree)
        assert normal_python(REPO, "import " + ", ".join(unmeasured[1:])).returncode == 0
    finally:
        probe.close()


def test_a_file_swapped_between_the_read_and_the_import_does_not_run(tree: Path) -> None:
    """A race made deterministic: the package's __init__ swaps errors.py on disk for an
    evil one before sgmonitor.errors is imported."""
    genuine_errors = (tree / "sgmonitor/errors.py").read_bytes()
    evil_errors = genuine_errors.decode() + MARKER_CODE.format(up=1)
    init = tree / "sgmonitor/__init__.py"
    init.write_text(
        init.read_text() + "import pathlib\n"
        f"pathlib.Path(__file__).with_name('errors.py').write_text({evil_errors!r})\n"
    )

    assert normal_python(tree, "import sgmonitor.errors").returncode == 0
    assert pwned(tree), "an ordinary import should run the swapped-in file"
    (tree / "PWNED").unlink()
    (tree / "sgmonitor/errors.py").write_bytes(genuine_errors)

    _, manifest = measure(tree)
    assert (tree / "sgmonitor/errors.py").read_text() == evil_errors  # the swap happened
    assert not pwned(tree)
    assert f"file sgmonitor/errors.py {sha(genuine_errors)}\n" in manifest

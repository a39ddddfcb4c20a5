"""The enclave's measured launch: what runs is exactly what MRENCLAVE covers.

Like SGX's EINIT over the enclave's pages (or Gramine's trusted files), the enclave process
measures every byte it will execute before it runs any of it. It is started as::

    python -I -B -S -c STUB <root>/sgmonitor/tee/boot.py --root <root> [--site DIR]... \\
        [--measure-only] <the enclave's own arguments>

with an empty environment. ``-I`` ignores ``PYTHON*`` variables and the current directory,
``-S`` skips ``site`` (no ``.pth`` files run), ``-B`` writes no bytecode. ``STUB`` reads this
file once and executes those very bytes, which then:

1. read every enclave source (``ENCLAVE_SOURCES``) once into memory;
2. install :class:`MeasuredFinder` first on ``sys.meta_path``: ``sgmonitor`` is served only
   from those bytes, every other module is located on ``sys.path``, its file read once and
   executed from the bytes read (sources compiled, extension modules loaded from a sealed
   in-memory copy, bytecode-only modules refused), so no ``.pyc``, stray ``.so`` or file
   swapped after the read can change what runs without changing the measurement;
3. import everything the enclave will ever need, then seal the finder: any later import
   fails, so nothing unmeasured can be loaded lazily;
4. compute MRENCLAVE, the SHA-256 of :func:`build_manifest`, and call
   ``sgmonitor.enclave.__main__.main(argv, mrenclave=...)``.

The same file is imported as ``sgmonitor.tee.boot`` by the host, for the launch command line
(:func:`enclave_argv`, :func:`clean_env`) and the expected measurement
(:func:`measure_installed`). It uses the standard library only: it runs before any
``sgmonitor`` code is trusted.
"""

# No ``from __future__ import annotations``: that statement imports the ``__future__``
# module, and nothing but the interpreter's preloaded modules may run before the finder.
# For the same reason modules and paths are typed ``object`` (``types`` and ``typing``
# are not loaded yet), and the few places mypy sees through that carry an ignore.
import _imp
import sys
from _frozen_importlib import ModuleSpec
from _frozen_importlib_external import (
    ExtensionFileLoader,
    PathFinder,
    SourceFileLoader,
    SourcelessFileLoader,
)

__all__ = [
    "BOOT_RELPATH",
    "ENCLAVE_SOURCES",
    "STUB",
    "BootError",
    "MeasuredFinder",
    "Measurement",
    "build_manifest",
    "clean_env",
    "enclave_argv",
    "measure_installed",
]

# What the enclave process runs, relative to the root holding the ``sgmonitor`` package:
# the ``*.py`` files of these (a Gramine manifest would list them as trusted files).
ENCLAVE_SOURCES: tuple[str, ...] = (
    "sgmonitor/__init__.py",
    "sgmonitor/errors.py",
    "sgmonitor/channel.py",
    "sgmonitor/keywrap.py",
    # the wire families the enclave speaks, not the hypervisor's session set-up, the
    # attestation or monitor links or the admin socket (the library's and services')
    "sgmonitor/wire/__init__.py",
    "sgmonitor/wire/core.py",
    "sgmonitor/wire/sealed.py",
    "sgmonitor/wire/calls.py",
    "sgmonitor/statement.py",
    "sgmonitor/monitorlink.py",
    "sgmonitor/tee",
    "sgmonitor/enclave",
    "sgmonitor/kernel",
    "sgmonitor/ids",
)

BOOT_RELPATH = "sgmonitor/tee/boot.py"
_BOOT_NAME = "__sgmonitor_boot__"
_ENTRY = "sgmonitor.enclave.__main__"  # its main(argv, *, mrenclave) runs the enclave
_INTERPRETER_FLAGS = ("-I", "-B", "-S")
# Reads the boot file once and executes the bytes it read, handing them over so the boot
# measures exactly what it is; the boot checks it was started by this very text.
STUB = (
    "import sys\n"
    "p = sys.argv[1]\n"
    "with open(p, 'rb') as f:\n"
    "    b = f.read()\n"
    f"exec(compile(b, p, 'exec', dont_inherit=True), {{'__name__': {_BOOT_NAME!r}, "
    "'BOOT_SOURCE': b})\n"
)
_MANIFEST_HEADER = "sgmonitor-enclave-boot v1\n"
_SEAL_ATTEMPTS = 100_000
# Modules the enclave needs but imports lazily (inside functions), so they are loaded and
# measured before the seal: argparse's HelpFormatter imports shutil, gettext imports locale.
_LAZILY_IMPORTED = (
    "locale",
    "shutil",
    # imported inside X25519 key functions (cryptography.hazmat.primitives.asymmetric)
    "cryptography.hazmat.backends.openssl.backend",
)


class BootError(Exception):
    """The measured launch cannot go on (odd source tree, bad arguments, failed measure)."""


class MeasuredFinder:
    """The only way modules get into the enclave process, and the record of what did.

    Finder and loader at once: ``sgmonitor`` modules come from ``sources`` (read once at
    boot), any other module's file is read once here and executed from those bytes. The
    interpreter's built-in and frozen modules are left to the interpreter (they are part
    of its binary, which the manifest covers). After :meth:`seal`, every import fails.
    """

    def __init__(self) -> None:
        # module name -> (relative path, source bytes, is package): the enclave's own code
        self.sources: dict[str, tuple[str, bytes, bool]] = {}
        # other modules, in load order: name -> bytes executed, or "builtin" / "frozen"
        self.loaded: dict[str, bytes | str] = {}
        self.root = ""  # the directory holding the sgmonitor package (for __file__)
        self.sealed = False
        self._unsealed: list[int] = []  # in-memory copies of extension modules, to seal

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        """The measured spec for ``name``; ImportError if sealed or not measurable."""
        if self.sealed:
            raise ImportError(f"module {name!r} was not measured at launch", name=name)
        if name == "sgmonitor" or name.startswith("sgmonitor."):
            return self._enclave_spec(name)
        if name in sys.builtin_module_names or _imp.is_frozen(name):
            self.loaded[name] = "builtin" if name in sys.builtin_module_names else "frozen"
            return None  # the built-in and frozen importers load it from the interpreter
        found = PathFinder.find_spec(name, path)  # type: ignore[arg-type]
        if found is None:
            return None
        if isinstance(found.loader, SourcelessFileLoader):
            raise ImportError(f"{name}: only bytecode at {found.origin}; refused", name=name)
        if isinstance(found.loader, SourceFileLoader):
            kind = "source"
        elif isinstance(found.loader, ExtensionFileLoader):
            kind = "extension"
        else:
            raise ImportError(f"{name}: cannot measure {found.loader!r}", name=name)
        with open(found.origin, "rb") as f:  # type: ignore[arg-type]
            found.loader_state = (kind, f.read())
        found.loader = self  # type: ignore[assignment]
        return found

    def _enclave_spec(self, name: str) -> object:
        if name not in self.sources:
            raise ModuleNotFoundError(f"{name} is not among the measured sources", name=name)
        rel, data, is_package = self.sources[name]
        origin = f"{self.root}/{rel}"
        spec = ModuleSpec(name, self, origin=origin, is_package=is_package)  # type: ignore[arg-type]
        spec.has_location = True
        spec.loader_state = ("enclave", data)
        if is_package:
            spec.submodule_search_locations = [origin.rpartition("/")[0]]
        return spec

    def create_module(self, spec: ModuleSpec) -> object:
        """Extension modules: dlopen a sealed in-memory copy of the bytes read."""
        kind, data = spec.loader_state
        if kind != "extension":
            return None
        self.loaded[spec.name] = data
        spec.origin = self._memfd_copy(spec.name, data)
        return ExtensionFileLoader(spec.name, spec.origin).create_module(spec)

    def exec_module(self, module: object) -> None:
        """Run the bytes read at find time: compiled from source, never from a .pyc."""
        spec = module.__spec__  # type: ignore[attr-defined]
        kind, data = spec.loader_state
        spec.loader_state = (kind, b"")  # the bytes stay in sources/loaded until measured
        if kind == "extension":
            ExtensionFileLoader(spec.name, spec.origin).exec_module(module)  # type: ignore[arg-type]
            self._seal_memfds()
            return
        if kind == "source":
            self.loaded[spec.name] = data
        exec(compile(data, spec.origin, "exec", dont_inherit=True), module.__dict__)

    def seal(self) -> None:
        """From now on every import fails: all the enclave runs was measured."""
        self._seal_memfds()
        self.sealed = True

    def _memfd_copy(self, name: str, data: bytes) -> str:
        import os

        # Never closed: dlopen takes a library it already has by its path name, so the
        # number must not come back for another module.
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self._unsealed.append(fd)
        self._seal_memfds()
        return f"/proc/self/fd/{fd}"

    def _seal_memfds(self) -> None:
        fcntl = sys.modules.get("fcntl")  # fcntl itself is an extension module: seal it later
        if fcntl is None:
            return
        import os

        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        for fd in self._unsealed:
            # F_SEAL_WRITE answers EBUSY while the kernel still holds the pages just
            # written (a busy host): try again, a bounded number of times.
            for attempt in range(_SEAL_ATTEMPTS):
                try:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
                    break
                except OSError as exc:
                    if exc.errno != 16 or attempt == _SEAL_ATTEMPTS - 1:  # EBUSY
                        raise
                    os.sched_yield()
        self._unsealed.clear()


def build_manifest(boot_source: bytes, preloaded: dict[str, object], finder: MeasuredFinder) -> str:
    """The canonical text MRENCLAVE is the SHA-256 of: one line per thing that runs,
    sorted, with no host paths in it, so every host with the same code, interpreter and
    libraries gets the same value. Readable, for debugging a mismatch."""
    import hashlib
    import os

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def file_sha(path: str) -> str:
        with open(path, "rb") as f:
            return sha(f.read())

    version = " ".join(sys.version.split())
    lines = [
        f"boot {sha(boot_source)}",
        f"flags {sys.flags}",
        f"interpreter {version} {sys.implementation.cache_tag} "
        f"{file_sha(os.path.realpath(sys.executable))}",
    ]
    # A dynamically linked interpreter is mostly its libpython (the frozen modules too).
    for lib in _mapped_libpython():
        lines.append(f"interpreter-library {os.path.basename(lib)} {file_sha(lib)}")
    # The simulation's root of trust, with the interpreter binary: these modules ran before
    # the boot could measure anything (the interpreter's start-up imports), so the manifest
    # can only record what their files hold now.
    for name, module in preloaded.items():
        spec = getattr(module, "__spec__", None)
        if getattr(module, "__file__", None) is None:
            continue
        what = "frozen" if spec is not None and spec.origin == "frozen" else None
        lines.append(f"preloaded {name} {what or file_sha(module.__file__)}")  # type: ignore[attr-defined]
    for rel, data, _ in finder.sources.values():
        lines.append(f"file {rel} {sha(data)}")
    for name, data in finder.loaded.items():  # type: ignore[assignment]
        lines.append(f"module {name} {data if isinstance(data, str) else sha(data)}")
    return _MANIFEST_HEADER + "".join(sorted(line + "\n" for line in lines))


def _mapped_libpython() -> list[str]:
    with open("/proc/self/maps") as f:
        paths = {fields[5] for fields in (line.split(None, 5) for line in f) if len(fields) == 6}
    return sorted(p.strip() for p in paths if p.rpartition("/")[2].startswith("libpython"))


def _read_sources(root: str) -> dict[str, tuple[str, bytes, bool]]:
    """Every ``*.py`` of ``ENCLAVE_SOURCES`` under ``root``, each read once; symlinks,
    non-regular files and paths that are no module name are refused."""
    import os
    import stat

    out: dict[str, tuple[str, bytes, bool]] = {}

    def add(rel: str) -> None:
        parts = rel[:-3].split("/")
        if not all(part.isidentifier() for part in parts):
            raise BootError(f"enclave source path {rel!r} is not a module name")
        try:
            fd = os.open(f"{root}/{rel}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise BootError(f"enclave source {rel}: {exc.strerror} (symlink?)") from None
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BootError(f"enclave source {rel} is not a regular file")
            data = f.read()
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (rel, data, is_package)

    for src in ENCLAVE_SOURCES:
        path = f"{root}/{src}"
        if os.path.islink(path):
            raise BootError(f"enclave source {src} is a symlink")
        if os.path.isfile(path):
            add(src)
        elif os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                for name in dirnames:
                    if os.path.islink(f"{dirpath}/{name}"):
                        raise BootError(f"enclave source {dirpath}/{name} is a symlink")
                for name in filenames:
                    if name.endswith(".py"):
                        add(os.path.relpath(f"{dirpath}/{name}", root))
        # else: a package not written yet measures as absent, deterministically
    return out


def _parse_boot_args(argv: list[str]) -> tuple[str, list[str], bool, list[str]]:
    """The boot's own options, which come first; the rest is the enclave's."""
    root, site, measure_only = "", [], False
    while argv and argv[0] in ("--root", "--site", "--measure-only"):
        option, argv = argv[0], argv[1:]
        if option == "--measure-only":
            measure_only = True
            continue
        if not argv or not argv[0].startswith("/"):
            raise BootError(f"{option} needs an absolute directory")
        if option == "--root":
            root = argv[0]
        else:
            site.append(argv[0])
        argv = argv[1:]
    if not root:
        raise BootError("--root is required")
    return root, site, measure_only, argv


def _boot(boot_source: bytes, argv: list[str]) -> int:
    """Measure, seal, then run the enclave (or print the measurement)."""
    preloaded = dict(sys.modules)
    finder = MeasuredFinder()
    sys.meta_path[:] = [finder, *(f for f in sys.meta_path if f is not PathFinder)]  # type: ignore[list-item]
    try:
        launch = [*_INTERPRETER_FLAGS, "-c", STUB]
        if sys.orig_argv[1 : 1 + len(launch)] != launch:
            raise BootError("not started by boot.STUB with the interpreter flags it needs")
        root, site, measure_only, rest = _parse_boot_args(argv)
        finder.root = root
        sys.path.extend(site)
        import fcntl  # noqa: F401 - first, to seal the in-memory copies of extension modules
        import hashlib
        import json

        finder.sources = _read_sources(root)
        if _ENTRY not in finder.sources:
            raise BootError(f"no enclave entry point {_ENTRY} under {root}")
        for name in (*_LAZILY_IMPORTED, *sorted(finder.sources)):
            __import__(name)
        finder.seal()
        manifest = build_manifest(boot_source, preloaded, finder)  # type: ignore[arg-type]
    except BootError as exc:
        print(f"sgmonitor boot: refusing to start: {exc}", file=sys.stderr, flush=True)
        return 2
    finder.loaded = {}  # the bytes are measured; keep only the seal
    mrenclave = hashlib.sha256(manifest.encode()).digest()
    if measure_only:
        print(json.dumps({"mrenclave": mrenclave.hex(), "manifest": manifest}), flush=True)
        return 0
    main = sys.modules[_ENTRY].main
    return int(main(rest, mrenclave=mrenclave))


if __name__ == _BOOT_NAME:
    # BOOT_SOURCE is put in this module's globals by STUB: the bytes being executed.
    sys.exit(_boot(globals()["BOOT_SOURCE"], sys.argv[2:]))


# --- the host's side: how to launch the enclave, and what it should measure -----------
# Imported here, not at the top: in the enclave they load through the measured finder.
import os  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Measurement:
    """MRENCLAVE and the manifest it hashes (to see what differs on a mismatch)."""

    mrenclave: bytes
    manifest: str


def clean_env() -> dict[str, str]:
    """The enclave's environment: none of the host's (no PYTHON*, no locale), so it cannot
    steer the interpreter and every launch starts the same way."""
    return {}


def enclave_argv(*, python: str = sys.executable, root: Path, extra: list[str]) -> list[str]:
    """The measured launch's command line: the boot from ``root``'s own tree, the
    interpreter's site-packages (``-S`` skips them), then ``extra`` (the enclave's
    arguments, or ``--measure-only``)."""
    root = Path(root).resolve()
    argv = [python, *_INTERPRETER_FLAGS, "-c", STUB, str(root / BOOT_RELPATH), "--root", str(root)]
    for site in _site_dirs(python):
        argv += ["--site", site]
    return [*argv, *extra]


def _site_dirs(python: str) -> list[str]:
    if python == sys.executable:
        import sysconfig

        paths = sysconfig.get_paths()
        dirs = [paths["purelib"], paths["platlib"]]
    else:
        import json
        import subprocess

        code = "import json, sysconfig; p = sysconfig.get_paths(); "
        code += "print(json.dumps([p['purelib'], p['platlib']]))"
        out = subprocess.run(
            [python, "-I", "-c", code], capture_output=True, check=True, timeout=60, env={}
        )
        dirs = json.loads(out.stdout)
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def measure_installed(
    python: str = sys.executable, root: Path = _ROOT, *, timeout: float = 120.0
) -> Measurement:
    """The MRENCLAVE a launch of ``root``'s enclave on ``python`` will have: the boot run
    with ``--measure-only`` (everything up to the seal) in a subprocess."""
    import json
    import subprocess

    argv = enclave_argv(python=python, root=root, extra=["--measure-only"])
    try:
        proc = subprocess.run(
            argv,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BootError(f"measuring the enclave took over {timeout:.0f}s") from None
    err = proc.stderr.decode(errors="replace").strip()[-2000:]
    if proc.returncode != 0:
        raise BootError(f"measuring the enclave failed (exit {proc.returncode}): {err}")
    try:
        doc = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        measurement = Measurement(bytes.fromhex(doc["mrenclave"]), doc["manifest"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BootError(f"measuring the enclave printed no measurement ({exc}): {err}") from None
    if len(measurement.mrenclave) != 32:
        raise BootError("measuring the enclave printed a malformed MRENCLAVE")
    return measurement

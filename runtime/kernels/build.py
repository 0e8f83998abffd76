"""Build the hadanorm kernel library: ``python -m runtime.kernels.build [--force] [--output-dir DIR]``.

Needs g++ (or $CXX) and onnxruntime's C/C++ API headers, which are not in the onnxruntime wheel. Headers are taken
from, in order:

1. ``$ORT_INCLUDE_DIR`` (a folder holding ``onnxruntime_cxx_api.h``, or its ``onnxruntime/`` parent);
2. the cache ``runtime/kernels/_ort_headers/`` (git-ignored; filled by step 3);
3. Debian trixie's ``libonnxruntime-dev`` (onnxruntime 1.21, C API 21), downloaded with apt-get into a temporary
   folder and unpacked with ``dpkg -x`` (nothing is installed). The apt source is this machine's own (from
   /etc/apt/sources.list and /etc/apt/sources.list.d/) with its release name replaced by trixie, in a temporary
   apt configuration.

Every ``*.cc`` of this folder is compiled (in parallel, one compiler per core) and linked into one library, without
linking against onnxruntime (``-DORT_API_MANUAL_INIT``); its ``RegisterCustomOps`` asks the loading onnxruntime for
the headers' API version, so a library built against API 21 loads in every onnxruntime >= 1.21. The result is
``runtime/kernels/build/libhadanorm_kernels.so``; it is rebuilt only when a source or header, the headers' API
version, the compiler or the flags change (a ``.stamp`` file beside it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime.file_lock import exclusive

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("*.cc"))  # every source of the library (arch-specific ones compile to nothing elsewhere)
HEADERS = sorted(HERE.glob("*.h"))
HEADER_CACHE = HERE / "_ort_headers"
DEFAULT_OUTPUT_DIR = HERE / "build"
LIBRARY_NAME = "libhadanorm_kernels.so"

HEADER_PACKAGE = "libonnxruntime-dev"
HEADER_SUITE = "trixie"  # Debian 13: libonnxruntime-dev 1.21 (C API 21)
CXX_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++20", "-DORT_API_MANUAL_INIT", "-fvisibility=hidden", "-Wall",
             "-ffp-contract=off"]
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCE_PARTS = Path("/etc/apt/sources.list.d")


class BuildError(RuntimeError):
    """The kernel library could not be built; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------------------------------------------


def _header_dir(folder: Path) -> Path | None:
    for candidate in (folder, folder / "onnxruntime"):
        if (candidate / "onnxruntime_cxx_api.h").is_file() and (candidate / "onnxruntime_c_api.h").is_file():
            return candidate
    return None


def header_api_version(include_dir: Path) -> int:
    text = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    match = re.search(r"^#define ORT_API_VERSION (\d+)", text, re.MULTILINE)
    if not match:
        raise BuildError(f"no ORT_API_VERSION in {include_dir / 'onnxruntime_c_api.h'}")
    return int(match.group(1))


def find_headers() -> Path | None:
    """The folder with onnxruntime_cxx_api.h from $ORT_INCLUDE_DIR or the cache, or None."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        found = _header_dir(Path(env))
        if found is None:
            raise BuildError(f"ORT_INCLUDE_DIR={env} holds no onnxruntime_cxx_api.h / onnxruntime_c_api.h")
        return found
    return _header_dir(HEADER_CACHE)


def _os_codename() -> str | None:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    match = re.search(r"^VERSION_CODENAME=\"?([A-Za-z0-9_-]+)\"?$", text, re.MULTILINE)
    return match.group(1) if match else None


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, current, key = [], {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if line[0] in " \t" and key:
            current[key] += " " + line.strip()
            continue
        if ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _one_line_entries(text: str) -> list[dict[str, str]]:
    """``deb [opts] uri suite comp...`` lines as deb822-like dicts."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        options = {}
        match = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        rest = line[4:].strip()
        if match:
            for option in match.group(1).split():
                if "=" in option:
                    k, v = option.split("=", 1)
                    options[k.lower()] = v
            rest = match.group(2)
        parts = rest.split()
        if len(parts) < 3:
            continue
        entry = {"types": "deb", "uris": parts[0], "suites": parts[1], "components": " ".join(parts[2:])}
        if "signed-by" in options:
            entry["signed-by"] = options["signed-by"]
        if "arch" in options:
            entry["architectures"] = options["arch"].replace(",", " ")
        entries.append(entry)
    return entries


def trixie_sources(codename: str | None = None) -> str:
    """A deb822 sources file: this machine's Debian entries for its own release, with the suite set to trixie."""
    codename = codename or _os_codename()
    entries: list[dict[str, str]] = []
    if APT_SOURCES.is_file():
        entries += _one_line_entries(APT_SOURCES.read_text(errors="replace"))
    for path in sorted(glob.glob(str(APT_SOURCE_PARTS / "*.list"))):
        entries += _one_line_entries(Path(path).read_text(errors="replace"))
    for path in sorted(glob.glob(str(APT_SOURCE_PARTS / "*.sources"))):
        entries += _deb822_stanzas(Path(path).read_text(errors="replace"))
    stanzas = []
    for entry in entries:
        if "deb" not in entry.get("types", "").split() or entry.get("enabled", "yes").lower() == "no":
            continue
        suites = entry.get("suites", "").split()
        if not (codename and codename in suites) and HEADER_SUITE not in suites:
            continue  # only the release's main suite (not -updates/-security, not third-party repositories)
        lines = ["Types: deb", f"URIs: {entry['uris']}", f"Suites: {HEADER_SUITE}",
                 f"Components: {entry.get('components', 'main')}"]
        for key, name in (("signed-by", "Signed-By"), ("architectures", "Architectures")):
            if key in entry:
                lines.append(f"{name}: {entry[key]}")
        stanzas.append("\n".join(lines))
    if not stanzas:
        raise BuildError(
            f"no Debian apt source for release {codename!r} in {APT_SOURCES} or {APT_SOURCE_PARTS}/ to derive a "
            f"{HEADER_SUITE} source from; set ORT_INCLUDE_DIR to a folder with onnxruntime's C/C++ API headers"
        )
    return "\n\n".join(dict.fromkeys(stanzas)) + "\n"


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BuildError(f"`{' '.join(cmd[:2])} ...` failed (exit {proc.returncode}): {' | '.join(tail)}")


def fetch_headers(dest: Path = HEADER_CACHE, log=None) -> Path:
    """Download Debian trixie's libonnxruntime-dev with apt-get (temporary config), unpack its headers into dest."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found: set ORT_INCLUDE_DIR to a folder with onnxruntime's C/C++ API headers")
    with tempfile.TemporaryDirectory(prefix="hn-ort-headers-") as tmp_name:
        tmp = Path(tmp_name)
        sources = tmp / "trixie.sources"
        sources.write_text(trixie_sources())
        for sub in ("lists/partial", "cache/archives/partial", "download", "unpacked"):
            (tmp / sub).mkdir(parents=True)
        apt = ["apt-get", "-q",
               "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
               "-o", f"Dir::State::Lists={tmp / 'lists'}", "-o", f"Dir::Cache={tmp / 'cache'}"]
        if os.geteuid() == 0:
            apt += ["-o", "APT::Sandbox::User=root"]  # the temporary folders are not readable by _apt
        (log or logger.info)(f"fetching onnxruntime headers: apt-get update + download {HEADER_PACKAGE} "
                             f"({HEADER_SUITE})")
        _run(apt + ["update"])
        _run(apt + ["download", HEADER_PACKAGE], cwd=tmp / "download")
        debs = sorted((tmp / "download").glob(f"{HEADER_PACKAGE}_*.deb"))
        if not debs:
            raise BuildError(f"apt-get download {HEADER_PACKAGE} produced no .deb")
        _run(["dpkg", "-x", str(debs[0]), str(tmp / "unpacked")])
        found = _header_dir(tmp / "unpacked" / "usr" / "include")
        if found is None:
            raise BuildError(f"{debs[0].name} holds no onnxruntime_cxx_api.h")
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(found, staging)
        (staging / "PACKAGE.txt").write_text(f"{debs[0].name} (Debian {HEADER_SUITE}), unpacked with dpkg -x\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


def ensure_headers(log=None) -> Path:
    found = find_headers()
    if found is None:
        fetch_headers(HEADER_CACHE, log)
        found = _header_dir(HEADER_CACHE)
        assert found is not None
    return found


# ---------------------------------------------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------------------------------------------


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"C++ compiler {cxx!r} not found (install g++ or set CXX)")
    return cxx


def _stamp(cxx: str, include_dir: Path, flags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(f"{path.name}\n".encode())
        digest.update(path.read_bytes())
    digest.update(f"api={header_api_version(include_dir)}\n".encode())
    digest.update(" ".join([cxx, *flags]).encode())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest.update("".join(version).encode())
    return digest.hexdigest()


def build(output_dir: str | os.PathLike | None = None, force: bool = False, log=None) -> Path:
    """Build (or reuse) the kernel library; returns the path of ``libhadanorm_kernels.so``."""
    log = log or logger.info
    out_dir = Path(output_dir) if output_dir is not None else DEFAULT_OUTPUT_DIR
    library = out_dir / LIBRARY_NAME
    stamp_file = out_dir / (LIBRARY_NAME + ".stamp")
    cxx = _compiler()
    with exclusive(out_dir / ".build.lock"):
        include_dir = ensure_headers(log)
        flags = list(CXX_FLAGS)
        stamp = _stamp(cxx, include_dir, flags)
        if not force and library.is_file() and stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
            return library
        log(f"compiling {len(SOURCES)} sources (onnxruntime C API {header_api_version(include_dir)}) -> {library}")
        tmp = out_dir / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
        with tempfile.TemporaryDirectory(prefix=".objects-", dir=out_dir) as objects:
            _compile_and_link(cxx, flags, include_dir, Path(objects), tmp)
        os.replace(tmp, library)  # a new file: processes that loaded the old one keep it
        stamp_file.write_text(stamp + "\n")
    return library


def _compile_and_link(cxx: str, flags: list[str], include_dir: Path, objects: Path, target: Path) -> None:
    """Every source to an object file (in parallel, one compiler per core), then one link."""
    compile_flags = [f for f in flags if f != "-shared"]
    jobs = []
    for source in SOURCES:
        obj = objects / (source.stem + ".o")
        cmd = [cxx, *compile_flags, f"-I{include_dir}", f"-I{HERE}", "-c", str(source), "-o", str(obj)]
        jobs.append((source, obj, cmd))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda job: subprocess.run(job[2], capture_output=True, text=True), jobs))
    for (source, _, _), proc in zip(jobs, results):
        if proc.returncode:
            raise BuildError(f"compiling {source.name} failed:\n{proc.stderr.strip()}")
    proc = subprocess.run([cxx, *flags, *(str(obj) for _, obj, _ in jobs), "-o", str(target)], capture_output=True,
                          text=True)
    if proc.returncode:
        target.unlink(missing_ok=True)
        raise BuildError(f"linking the kernel library failed:\n{proc.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the library is up to date")
    parser.add_argument("--output-dir", type=Path, default=None, help=f"default: {DEFAULT_OUTPUT_DIR}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # progress: fetch, compile
    try:
        print(build(args.output_dir, force=args.force))
    except BuildError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

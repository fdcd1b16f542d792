"""What goes to the Jetson: one .tar.gz with the ONNX forms, plugin sources, manifest, reference and steps.

Engines are not portable (docs/ATS_RULE.md section 5), so the bundle carries what the Jetson needs to build them
itself: what the export's ``manifest.json`` lists (the ONNX forms: portable, plugin, fp16/int8 when present;
``reference.npz`` for parity without torch; Polygraphy's JSON files; INT8 scale files recorded there), the
manifest itself, the plugin's C++/CUDA sources
(``plugins/ats_sampler``), a generated README with the exact commands for JetPack 6.1/6.2 (TensorRT 10.3,
Orin sm_87) and JetPack 7.x (TensorRT 10.13+/11.x, Thor sm_110), and ``SHA256SUMS``. The archive is written
under a temporary name and renamed into place. numpy/onnx only: no torch, no tensorrt.

Only files the manifest lists are packed: an earlier export (or calibration) into the same folder can leave
graphs the current manifest does not describe, and those must not reach a device. They are named in a one-line
warning on stderr instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import MANIFEST, default_file_mode, read_manifest
from ..errors import ConfigError, ExportError, InputError
from .polygraphy_io import INPUTS_FILE, OUTPUTS_FILE, polygraphy_command

__all__ = ["BundleResult", "CLI_OPTIONS", "make_bundle", "render_readme"]

PLUGIN_LIB = "build/ats_sampler/libats_sampler.so"
TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
# The ats-deploy command lines the README uses, with the options each one needs (tests check them).
CLI_OPTIONS: dict[str, tuple[str, ...]] = {
    "plugin build": ("--cuda-arch", "--build-dir"),
    "build": ("--precision", "--plugin-lib", "-o", "--batch"),
    "verify": ("--reference", "--plugin-lib"),
}
JETPACKS = (
    # label, L4T, TensorRT, CUDA, GPU, arch, system Python (its TensorRT bindings)
    ("JetPack 6.1 / 6.2", "R36.4", "10.3", "12.6", "Orin", "87", "3.10"),
    ("JetPack 7.x", "R38", "10.13+ (11.x from JetPack 7.2.2)", "13", "Thor", "110", "3.12"),
)
WHEEL_ENV = "ATS_DEPLOY_WHEEL"  # a ready ats-deploy wheel to carry instead of building one
_SKIP_DIRS = {"build", "__pycache__", ".git"}


@dataclass(frozen=True)
class BundleResult:
    path: Path
    files: tuple[str, ...]  # paths inside the archive, relative to its top folder
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return {"path": str(self.path), "files": list(self.files), "sha256": self.sha256, "bytes": self.bytes}


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_scales(p: Path) -> bool:
    return p.suffix in (".json", ".npz") and "scale" in p.name.lower()


def _packable(p: Path) -> bool:
    """Whether ``p`` is a kind of file the bundle would carry (graphs, engines, side data, scales, reference)."""
    return (
        p.suffix in (".onnx", ".plan", ".engine")
        or p.name.endswith(".onnx.data")
        or _is_scales(p)
        or p.name in ("reference.npz", INPUTS_FILE, OUTPUTS_FILE)
    )


def _sha256_of(p: Path) -> str:
    """sha256 of an input file; an unreadable one is a one-line InputError naming it."""
    from ..artifacts import sha256_file

    try:
        return sha256_file(p)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise InputError(f"cannot read {p} ({why}); make it readable or re-run ats-deploy export") from None


def _read_export_manifest(out: Path) -> dict:
    """The export's manifest (read_manifest: JSON object, our format) with the parts the bundle uses checked."""
    man = read_manifest(out)
    arts = man.get("artifacts")
    if not isinstance(arts, dict):
        raise InputError(f'{out / MANIFEST} has no artifact list ("artifacts"); re-run ats-deploy export -o {out}')
    model = man.get("model")
    parts = {k: man.get(k) for k in ("ats", "graph", "model", "versions")}
    parts["model.architecture"] = model.get("architecture") if isinstance(model, dict) else None
    for key, sub in parts.items():
        if sub is not None and not isinstance(sub, dict):
            raise InputError(f'{out / MANIFEST} has a malformed "{key}" entry; re-run ats-deploy export -o {out}')
    for name, art in arts.items():
        plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name and not name.startswith(".")
        if not plain or not isinstance(art, dict) or not isinstance(art.get("sha256", ""), str):
            raise InputError(
                f"{out / MANIFEST} has a malformed artifact entry {name!r}; re-run ats-deploy export -o {out}"
            )
    return man


def _collect(out: Path, man: dict) -> dict[str, Path]:
    """Export artifacts to ship, name -> path: the manifest, what it lists (hashes checked) and the external
    weights (``<graph>.onnx.data``) of the graphs it lists. Other graphs, engines or side data in the folder
    (left by an earlier export) are not packed; they are named in a warning."""
    files: dict[str, Path] = {MANIFEST: out / MANIFEST}
    for name, art in sorted(man["artifacts"].items()):
        p = out / name
        if not p.is_file():
            raise InputError(f"{out} lacks {name}, which its manifest lists; re-run ats-deploy export -o {out}")
        if art.get("sha256") and _sha256_of(p) != art["sha256"]:
            raise InputError(f"{p} does not match its manifest (sha256); re-run ats-deploy export -o {out}")
        files[name] = p
        side = out / (name + ".data")
        if name.endswith(".onnx") and side.is_file():
            files[side.name] = side
    if "model.onnx" not in files:
        raise InputError(f"{out} has no model.onnx in its manifest; re-run ats-deploy export -o {out}")
    stale = [
        p.name
        for p in sorted(out.iterdir())
        if p.name not in files and not p.name.startswith(".") and p.is_file() and _packable(p)
    ]
    if stale:
        print(
            f"warning: not packing {', '.join(stale)}: not in {out / MANIFEST} (left by an earlier export?)",
            file=sys.stderr,
        )
    return files


def _top_name(name: str | None, dest: Path) -> str:
    """The archive's top folder: ``name`` (a plain folder name, else ConfigError), or the archive's stem."""
    if name is not None:
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ConfigError(
                f"--name {name!r} is not a plain folder name (no '/', '\\', '.' or '..'); pass e.g. --name ats-bundle"
            )
        return name
    stem = dest.name.removesuffix(".tar.gz").removesuffix(".tgz")
    return stem if stem not in ("", ".", "..") else "ats-bundle"


def _blocking_file(d: Path) -> Path | None:
    """The nearest existing non-folder among ``d`` and its parents (what makes creating ``d`` fail), if any."""
    for p in (d, *d.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def _temp_beside(dest: Path) -> tuple[str, list[Path]]:
    """A temporary file next to ``dest`` (its folder made if missing) and the folders made for it."""
    if dest.is_dir():
        raise ConfigError(f"-o {dest} is a folder; pass the archive's file name, e.g. -o {dest / 'ats_bundle.tar.gz'}")
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists() and not p.is_symlink()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        _remove_dirs(made)
        blocker = _blocking_file(dest.parent)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (exc.strerror or str(exc))
        raise ExportError(f"cannot write {dest} ({why}); choose another path with -o") from None
    os.close(fd)
    return tmp, made


def _remove_dirs(made: list[Path]) -> None:
    """Remove the (empty) folders this run created, deepest first."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            pass


def _plugin_files(plugin_src: Path | None) -> dict[str, Path]:
    from .plugin_lib import plugin_source_dir

    src = Path(plugin_src) if plugin_src is not None else plugin_source_dir()
    if not (src / "CMakeLists.txt").is_file():
        raise InputError(f"{src} is not the plugin source folder (no CMakeLists.txt); pass plugins/ats_sampler")
    out: dict[str, Path] = {}
    for root, dirs, names in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for n in sorted(names):
            p = Path(root) / n
            if p.is_file() and not n.startswith(".") and not n.endswith((".o", ".so", ".pyc")):
                out["plugins/ats_sampler/" + p.relative_to(src).as_posix()] = p
    return out


def _forms(out: Path, onnx_names: list[str]) -> list[dict]:
    """Per ONNX form: its name, precision, whether it has plugin nodes, and the engine name the README uses."""
    from .trt import inspect_onnx

    forms = []
    for name in onnx_names:
        facts = inspect_onnx(out / name)
        stem = name[: -len(".onnx")]
        plan = (
            "model.plan" if stem == "model.plugin" else ("model.portable.plan" if stem == "model" else stem + ".plan")
        )
        forms.append(
            {
                "onnx": name,
                "precision": facts.precision,
                "plugin": facts.plugin_nodes > 0,
                "plan": plan,
                "shape": list(facts.input_shape),
                "batch": facts.batch,
            }
        )
    # The plugin form first: it is the one the project ships; then the portable one, then the rest.
    order = {"model.plugin.onnx": 0, "model.onnx": 1}
    return sorted(forms, key=lambda f: (order.get(f["onnx"], 2), f["onnx"]))


def _fenced(title: str, *commands: str) -> list[str]:
    """README lines: a title, then the commands in a code block."""
    return [title, "", "```", *commands, "```", ""]


def render_readme(man: dict, forms: list[dict], contents: list[str], wheel: str = "wheels/ats_deploy.whl") -> str:
    """The bundle's README: exact steps on the Jetson (install, plugin, engines, verify, benchmark)."""
    ats = man.get("ats", {})
    graph = man.get("graph", {})
    shape_mode = ats.get("shape_mode", "static")
    dyn_batch = bool(graph.get("dynamic_batch"))
    arch_src = man.get("model", {}).get("architecture", {})
    img, chans = arch_src.get("img_size", 224), arch_src.get("in_chans", 3)
    has_plugin = any(f["plugin"] for f in forms)
    lines = [
        "# ats-deploy bundle",
        "",
        f"A ViT with Adaptive Token Sampling exported by ats-deploy: ATS blocks {ats.get('blocks')}, "
        f"K {ats.get('k_schedule')}, shape mode `{shape_mode}`, "
        + (
            f"dynamic batch, input [B, {chans}, {img}, {img}]."
            if dyn_batch
            else f"batch {graph.get('batch')}, input [{graph.get('batch')}, {chans}, {img}, {img}]."
        ),
        "TensorRT engines are not portable across GPUs or TensorRT versions: build them on the Jetson itself,",
        "with the steps below, in this folder.",
        "",
        "## Supported platforms",
        "",
        "| JetPack | L4T | TensorRT | CUDA | GPU | `--cuda-arch` |",
        "|---|---|---|---|---|---|",
    ]
    for label, l4t, trt_v, cuda_v, gpu, arch, _ in JETPACKS:
        lines.append(f"| {label} | {l4t} | {trt_v} | {cuda_v} | {gpu} | {arch} |")
    lines += [
        "",
        "JetPack 5.x (TensorRT 8.5) and 6.0 (TensorRT 8.6) cannot host the IPluginV3 sampler plugin; "
        "ats-deploy refuses them. Engines are strongly typed: the precision is that of the ONNX file.",
        "",
        "## Contents",
        "",
    ]
    lines += [f"- `{c}`" for c in contents]
    lines += [
        "",
        "## 1. Install (once)",
        "",
        "JetPack's TensorRT Python bindings live in its system Python, so the virtual environment is made from",
        "that Python and sees them; ats-deploy comes from the wheel in this bundle (no torch: the device",
        "commands need numpy, onnx and Polygraphy, which runs the engines and brings its own CUDA bindings):",
        "",
    ]
    for label, _, trt_v, cuda_v, _, _, py in JETPACKS:
        lines += _fenced(
            f"{label} (Python {py}, CUDA {cuda_v}, TensorRT {trt_v}):",
            f"python{py} -m venv --system-site-packages ~/ats-venv",
            f"~/ats-venv/bin/pip install {wheel} 'numpy<2'",
            ". ~/ats-venv/bin/activate",
        )
    lines += [
        "`~/ats-venv/bin/python -c 'import tensorrt; print(tensorrt.__version__)'` must print the TensorRT of the",
        "table: a virtual environment made from another Python does not see JetPack's bindings. `numpy<2` keeps",
        "the NumPy 1.x ABI that JetPack's system packages (OpenCV, TensorRT samples) were built against.",
        "",
    ]
    if has_plugin:
        lines += ["## 2. Build the sampler plugin", ""]
        for label, _, _, _, gpu, arch, _ in JETPACKS:
            cmd = f"ats-deploy plugin build --cuda-arch {arch} --build-dir build/ats_sampler"
            lines += _fenced(f"{label} ({gpu}, sm_{arch}):", cmd)
        lines += [
            "Or with CMake directly from the sources in this bundle (same result):",
            "",
            "```",
            "cmake -S plugins/ats_sampler -B build/ats_sampler -DCMAKE_BUILD_TYPE=Release "
            "-DCMAKE_CUDA_ARCHITECTURES=87 -DTensorRT_ROOT=/usr",
            "cmake --build build/ats_sampler --target ats_sampler --parallel",
            "```",
            "",
            f"Either way the library is `{PLUGIN_LIB}`.",
            "",
        ]
    batch_opt = " --batch 1,1,16" if dyn_batch else ""
    lines += ["## 3. Build the engines", "", "```"]
    for f in forms:
        plug = f" --plugin-lib {PLUGIN_LIB}" if f["plugin"] else ""
        lines.append(f"ats-deploy build {f['onnx']} --precision {f['precision']}{plug}{batch_opt} -o {f['plan']}")
    lines += [
        "```",
        "",
        "Each build writes the plan and, beside it, `<plan>.json` (TensorRT/CUDA versions, GPU, precision, hashes).",
        "Builds are cached in `~/.cache/ats-deploy/engines`; `--batch MIN,OPT,MAX` sets the batch profile of a "
        "dynamic-batch graph.",
        "",
        "## 4. Verify against PyTorch",
        "",
        "`reference.npz` holds the inputs and the PyTorch outputs; exit code 3 means a parity gate failed.",
        "",
        "```",
    ]
    for f in forms:
        plug = f" --plugin-lib {PLUGIN_LIB}" if f["plugin"] else ""
        lines.append(f"ats-deploy verify {f['plan']} --reference reference.npz{plug}")
    fp32 = [f for f in forms if f["precision"] == "fp32"]
    if fp32 and INPUTS_FILE in contents:
        lines += [
            "```",
            "",
            f"The same check with NVIDIA's Polygraphy alone, from the same data (`{INPUTS_FILE}`, `{OUTPUTS_FILE}`):",
            "the ONNX file on TensorRT (with the plugin library) or on ONNX Runtime (`--onnxrt`, which needs",
            "`~/ats-venv/bin/pip install onnxruntime` first: it is not part of the device install). Polygraphy",
            "compares kept tokens exactly, so an image whose pick sits on a decision boundary (docs/ATS_RULE.md",
            "section 2 of ats-deploy) can fail there and still pass `ats-deploy verify`, which reports such images",
            "separately.",
            "",
            "```",
        ]
        for f in fp32:
            lines.append(polygraphy_command(f["onnx"], plugin_lib=PLUGIN_LIB if f["plugin"] else None))
    shapes = f" --shapes=pixels:1x{chans}x{img}x{img}" if dyn_batch else ""
    graph_flag = " --useCudaGraph" if shape_mode == "static" else ""
    lines += ["```", "", "## 5. Benchmark", ""]
    if shape_mode != "static":
        lines += [
            "Shape mode `dynamic` has data-dependent shapes, which a CUDA graph cannot capture, so `--useCudaGraph` is "
            "left out.",
            "",
        ]
    lines += ["```"]
    for f in forms:
        plug = f" --staticPlugins={PLUGIN_LIB}" if f["plugin"] else ""
        lines.append(
            f"{TRTEXEC} --loadEngine={f['plan']}{plug}{shapes}{graph_flag} --noDataTransfers --useSpinWait "
            "--percentile=50,90,99"
        )
    lines += ["```", ""]
    if has_plugin:
        lines += [
            "`--staticPlugins` loads the default (self-registering) plugin build. For `--dynamicPlugins` (TensorRT's",
            "`loadLibrary` path, also `--setPluginsToSerialize`) build the plugin with `-DATS_SELF_REGISTER=OFF`:",
            "",
            "```",
            "cmake -S plugins/ats_sampler -B build/ats_sampler_dyn -DCMAKE_BUILD_TYPE=Release "
            "-DCMAKE_CUDA_ARCHITECTURES=87 -DTensorRT_ROOT=/usr -DATS_SELF_REGISTER=OFF",
            "cmake --build build/ats_sampler_dyn --target ats_sampler --parallel",
            f"{TRTEXEC} --loadEngine=model.plan --dynamicPlugins=build/ats_sampler_dyn/libats_sampler.so{shapes}"
            f"{graph_flag} --noDataTransfers --useSpinWait --percentile=50,90,99",
            "```",
            "",
        ]
    lines += [
        "Lock the clocks first for stable numbers (`sudo nvpmodel -m 0 && sudo jetson_clocks`) and compare the ATS",
        "engine with a dense export (`--ats-blocks none`) built and measured the same way.",
        "",
        f"Bundle written {time.strftime('%Y-%m-%d', time.gmtime())} by ats-deploy "
        f"{man.get('versions', {}).get('ats_deploy', '?')}.",
        "",
    ]
    return "\n".join(lines)


def project_wheel(work: Path) -> Path:
    """This ats-deploy as a wheel for the device: $ATS_DEPLOY_WHEEL if set, else built (pip wheel, no
    dependencies, no network) from the source tree this package runs from."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given)
        if path.suffix != ".whl" or not path.is_file():
            raise InputError(f"${WHEEL_ENV}={given} is not a wheel file; point it at an ats_deploy-*.whl")
        return path
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ExportError(
            f"no ats-deploy source tree beside {Path(__file__).resolve().parents[1]} to build the bundle's wheel "
            f"from; set {WHEEL_ENV}=path/to/ats_deploy-*.whl (pip download or pip wheel ats-deploy)"
        )
    import shutil
    import subprocess
    import sys
    import tempfile

    # Built from a fresh copy of what the wheel holds: setuptools reuses the tree's build/lib without
    # cleaning it, so a module deleted from the source would otherwise keep shipping to devices.
    with tempfile.TemporaryDirectory(prefix="ats-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(root / "ats_deploy", src / "ats_deploy", ignore=skip)  # symlinked plugin sources copied
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work)]
        res = subprocess.run([*cmd, str(src)], capture_output=True, text=True, check=False)
    wheels = sorted(work.glob("ats_deploy-*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(
            f"pip could not build the ats-deploy wheel for the bundle ({tail[0][:160]}); install setuptools and "
            f"wheel, or set {WHEEL_ENV}=path/to/ats_deploy-*.whl"
        )
    return wheels[-1]


def make_bundle(
    out_dir: str | os.PathLike[str],
    output_tar_gz: str | os.PathLike[str],
    *,
    plugin_src: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> BundleResult:
    """Pack the export in ``out_dir`` (+ plugin sources, README, SHA256SUMS) into ``output_tar_gz``.

    ``name`` is the archive's top folder (default: the archive's name without ``.tar.gz``).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(f"{out} is not a directory; pass the directory written by ats-deploy export")
    dest = Path(output_tar_gz)
    top = _top_name(name, dest)
    man = _read_export_manifest(out)
    artifacts = _collect(out, man)
    payload: dict[str, Path | bytes] = dict(artifacts)
    payload.update(_plugin_files(Path(plugin_src) if plugin_src is not None else None))
    forms = _forms(out, [n for n in artifacts if n.endswith(".onnx")])
    tmp, made = _temp_beside(dest)  # before the wheel build: a bad -o fails at once
    try:
        with tempfile.TemporaryDirectory() as wheel_dir:
            whl = project_wheel(Path(wheel_dir))
            try:
                payload[f"wheels/{whl.name}"] = whl.read_bytes()
            except OSError as exc:
                why = exc.strerror or type(exc).__name__
                raise InputError(f"cannot read the wheel {whl} ({why}); point ${WHEEL_ENV} elsewhere") from None
        contents = sorted([*payload, "README.md", "SHA256SUMS"])
        payload["README.md"] = render_readme(man, forms, contents, wheel=f"wheels/{whl.name}").encode()
        sums = []
        for arc in sorted(payload):
            item = payload[arc]
            digest = _sha256_bytes(item) if isinstance(item, bytes) else _sha256_of(item)
            sums.append(f"{digest}  {arc}")
        payload["SHA256SUMS"] = ("\n".join(sums) + "\n").encode()
        with tarfile.open(tmp, "w:gz") as tar:
            now = int(time.time())
            for arc in sorted(payload):
                item = payload[arc]
                if isinstance(item, bytes):
                    info = tarfile.TarInfo(f"{top}/{arc}")
                    info.size, info.mtime, info.mode = len(item), now, 0o644
                    tar.addfile(info, io.BytesIO(item))
                else:
                    try:
                        tar.add(str(item), arcname=f"{top}/{arc}", recursive=False)
                    except OSError as exc:
                        if Path(exc.filename or "") != item:
                            raise
                        raise InputError(f"cannot read {item} ({exc.strerror}); make it readable") from None
        os.chmod(tmp, default_file_mode())  # the umask's mode, like any other tool (mkstemp gives 0600)
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        _remove_dirs(made)
        raise ExportError(f"cannot write {dest} ({exc.strerror}); free space or choose another path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_dirs(made)
        raise
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    return BundleResult(dest, tuple(sorted(payload)), digest, dest.stat().st_size)

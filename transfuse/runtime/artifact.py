"""Saving and loading compiled models: a directory, checked before anything is parsed.

Layout of an artifact directory::

    manifest.json        format name + version, transfuse / torch versions, backend,
                         signature, file names, sha256 + size of every file below,
                         and a sha256 of the manifest's own content; a generation model
                         (runtime/generation_model.py) adds ``generation``: its KV cache
                         spec and generation config
    weights.safetensors  the graph's constants by value name (safetensors: no pickle)
    graph.txt            the graph in the IR text form (ir/printer.py)
    pass_log.json        the pass log (PassLog.to_json), or null
    code.py              the generated source, for reading only: never executed on load
    model.onnx           onnxruntime backend only: the model for plain ONNX Runtime
                         (weights in model.onnx.data above 2 GB); load rebuilds from the graph.
                         Not for a generation model (``deploy_onnx`` False: its caches are
                         written in place through IO binding, no plain ONNX file does that)
    model.onnx, profiles.json, build_engine.py, README.md
                         tensorrt backend (``CompiledModel.export_tensorrt``): the strongly typed
                         ONNX, optimization profiles and engine build script; load runs
                         model.engine (built later, not in the manifest) or model.onnx

``save`` writes everything into a temporary directory next to the target and renames it
into place, so a failure leaves no partial artifact. ``read`` (and
:func:`transfuse.runtime.compiled.load`, which lowers what it reads) refuses, with an
:class:`ArtifactError` naming the file and the problem, a missing or malformed manifest,
an unknown format version, a missing file, a size or hash mismatch (every file is checked
before any is parsed), a graph that does not parse or verify, and weights that are
missing, extra or of another dtype/shape than the graph declares. ``compiled.load`` then
regenerates the code with the backend. The hashes detect corruption and accidental edits;
they are not a signature against someone who can rewrite the whole directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from transfuse.codegen.version import transfuse_version
from transfuse.errors import ArtifactError, TransfuseError
from transfuse.ir.types import TensorType

FORMAT_NAME = "transfuse-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = {"weights": "weights.safetensors", "graph": "graph.txt", "pass_log": "pass_log.json",
         "code": "code.py"}
#: written for the onnxruntime backend, for deployment (plus model.onnx.data above 2 GB)
DEPLOY_ONNX = "model.onnx"


# -- save ---------------------------------------------------------------------------------


def save(compiled: Any, path: str | os.PathLike, *, backend: str | None = None,
         tensorrt: Mapping[str, Any] | None = None) -> Path:
    """Write ``compiled`` (a CompiledModel) as an artifact directory at ``path``.

    An existing artifact at ``path`` is replaced; any other existing file or
    non-empty directory there is refused. ``backend``: the backend the manifest names (default
    the compiled one's); "tensorrt" adds the TensorRT export files (``tensorrt``: the options of
    :func:`transfuse.codegen.tensorrt.target.write_export`).
    """
    target = Path(path)
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write(compiled, tmp, backend or compiled.backend, dict(tensorrt or {}))
        _replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, TransfuseError) or not isinstance(e, Exception):
            raise
        raise ArtifactError(f"saving the artifact to {target} failed: {type(e).__name__}: {e}; "
                            "nothing was written") from e
    return target


def _check_target(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"cannot save to {target}: it is a file, not an artifact directory")
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ArtifactError(f"cannot save to {target}: the directory is not empty and holds no "
                            f"{MANIFEST}; choose a new path")


def _replace(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write(compiled: Any, root: Path, backend: str, tensorrt: dict) -> None:
    from safetensors.torch import save_file

    from transfuse.ir.printer import print_graph

    graph = compiled.graph
    save_file(_weights_for_saving(graph), str(root / FILES["weights"]),
              metadata={"format": "pt", "producer": f"transfuse {transfuse_version()}"})
    _write_text(root / FILES["graph"], print_graph(graph))
    log = compiled.pass_log
    _write_text(root / FILES["pass_log"],
                json.dumps(log.to_json() if log is not None else None, indent=1))
    _write_text(root / FILES["code"], compiled.source)
    meta = dict(compiled.meta)
    if backend == "onnxruntime" and getattr(compiled, "deploy_onnx", True):
        compiled.export_onnx(str(root / DEPLOY_ONNX))  # for deployment; never read by load
    if backend == "tensorrt":  # model.onnx, profiles.json, build_engine.py, README.md; load reads
        from transfuse.codegen.tensorrt.target import write_export

        meta["tensorrt"] = write_export(root, graph, compiled.signature, **tensorrt)
    files = {}
    for p in sorted(root.iterdir()):
        files[p.name] = {"sha256": _sha256(p), "size": p.stat().st_size}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "transfuse_version": transfuse_version(),
        "torch_version": torch.__version__,
        "backend": backend,
        "graph_name": graph.name,
        "signature": compiled.signature.to_json(),
        "meta": json.loads(json.dumps(meta, default=str)),
        **FILES,
        "files": files,
    }
    generation = getattr(compiled, "generation_manifest", None)
    if generation is not None:  # a GenerationModel: its cache spec and generation config
        manifest["generation"] = json.loads(json.dumps(generation))
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _weights_for_saving(graph) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors by constant name; no two share memory (safetensors' rule)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, v in graph.constants.items():
        t = v.const.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        whole = storage.nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0
        if t.numel() and (key in seen or not whole):
            t = t.clone()
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        seen.add(key)
        out[name] = t
    return out


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The sha256 of a manifest's content without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- read -------------------------------------------------------------------------------------


@dataclasses.dataclass
class ArtifactContents:
    """What an artifact directory holds, checked and parsed (not yet lowered)."""

    root: Path
    graph: Any
    signature: Any
    pass_log: Any
    backend: str
    meta: dict
    #: a generation artifact's ``{"cache": spec, "config": generation config}``, else None
    generation: dict | None = None


def read(path: str | os.PathLike, device: str | torch.device | None = None) -> ArtifactContents:
    """Check and parse an artifact directory (weights on ``device``); nothing is lowered.

    :func:`transfuse.runtime.compiled.load` builds the :class:`CompiledModel` from it.
    """
    from transfuse.errors import IRVerifyError
    from transfuse.ir.signature import Signature
    from transfuse.ir.verify import verify

    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no artifact directory there")
    manifest = _read_manifest(root)
    _check_files(root, manifest)  # every file, before any is parsed
    weights = _read_weights(root / manifest["weights"], device)
    graph = _read_graph(root / manifest["graph"], root / manifest["weights"], weights)
    try:
        verify(graph)
    except IRVerifyError as e:
        raise ArtifactError(f"{root / manifest['graph']}: the graph does not verify: {e}") from None
    signature = Signature.from_json(manifest["signature"])
    pass_log = _read_pass_log(root / manifest["pass_log"])
    return ArtifactContents(root, graph, signature, pass_log, manifest["backend"],
                            manifest.get("meta") or {}, manifest.get("generation"))


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {root} is not a transfuse artifact")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: format is {manifest.get('format')!r}, "
                            f"expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version!r} is not supported by "
                            f"transfuse {transfuse_version()} (it reads version "
                            f"{FORMAT_VERSION}); re-save the model with this version")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ArtifactError(f"{path}: content does not match its manifest_sha256; the manifest "
                            "was edited or corrupted")
    for key, kind in (("backend", str), ("signature", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    generation = manifest.get("generation")
    if generation is not None and not (isinstance(generation, dict)
                                       and isinstance(generation.get("cache"), dict)
                                       and isinstance(generation.get("config", {}), dict)):
        raise ArtifactError(f"{path}: field 'generation' must be an object with a 'cache' "
                            f"object and a 'config' object, got {generation!r}")
    for key in FILES:
        name = manifest.get(key)
        if not isinstance(name, str) or not _plain_name(name):
            raise ArtifactError(f"{path}: field {key!r} must be a file name inside the "
                                f"artifact, got {name!r}")
        if name not in manifest["files"]:
            raise ArtifactError(f"{path}: no sha256/size recorded for {name}")
    return manifest


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and name != MANIFEST


def _check_files(root: Path, manifest: Mapping[str, Any]) -> None:
    for name, rec in manifest["files"].items():
        if not isinstance(name, str) or not _plain_name(name):
            raise ArtifactError(f"{root / MANIFEST}: file entry {name!r} is not a file name "
                                "inside the artifact")
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST})")
        if not isinstance(rec, dict) or not isinstance(rec.get("size"), int) \
                or not isinstance(rec.get("sha256"), str):
            raise ArtifactError(f"{root / MANIFEST}: malformed entry for {name}: {rec!r}")
        size = path.stat().st_size
        if size != rec["size"]:
            raise ArtifactError(f"{path}: size is {size} bytes, the manifest says {rec['size']}; "
                                "the file is truncated or was modified")
        digest = _sha256(path)
        if digest != rec["sha256"]:
            raise ArtifactError(f"{path}: sha256 {digest[:16]}… does not match the manifest "
                                f"({rec['sha256'][:16]}…); the file is corrupt or was modified")


def _read_weights(path: Path, device: str | torch.device | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path), device=str(torch.device(device)) if device else "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: cannot read the weights: {e}") from None
    # safetensors hands out tensors at arbitrary offsets of one buffer; BLAS picks other kernels
    # for unaligned operands (results differ in the last bit for small M). Fresh allocations
    # are aligned, so the loaded model is bit-identical to the one that was saved.
    return {name: t.clone() for name, t in weights.items()}


class _WeightsView(Mapping):
    """The weights as the parser's constants, remembering names it asked for and missed."""

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        self.weights = weights
        self.missing: list[str] = []

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.weights[name]
        except KeyError:
            self.missing.append(name)
            raise

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def _read_graph(path: Path, weights_path: Path, weights: dict[str, torch.Tensor]):
    from transfuse.errors import ParseError
    from transfuse.ir.parser import parse_graph

    view = _WeightsView(weights)
    try:
        graph = parse_graph(path.read_text(encoding="utf-8"), view)
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not UTF-8 text ({e})") from None
    except ParseError as e:
        if view.missing:
            raise ArtifactError(f"{weights_path}: no tensor for constant %{view.missing[0]} "
                                f"declared in {path.name}") from None
        raise ArtifactError(f"{path}: does not parse against {weights_path.name}: {e}") from None
    declared = graph.constants
    extra = sorted(set(weights) - set(declared))
    if extra:
        raise ArtifactError(f"{weights_path}: tensors {extra[:5]} are not constants of the graph "
                            f"in {path.name}")
    for name, v in declared.items():
        t = weights.get(name)
        if t is None:
            raise ArtifactError(f"{weights_path}: no tensor for constant %{name} declared in "
                                f"{path.name}")
        actual = TensorType.of(t)
        if actual != v.type.storage():
            raise ArtifactError(f"{weights_path}: constant %{name} is {actual} but {path.name} "
                                f"declares {v.type}")
        v.const = t  # inline-printed constants too: the saved bits, exactly
    return graph


def read_pass_log(path: str | os.PathLike):
    """The pass log of an artifact, after checking its manifest and file hashes."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no artifact directory there")
    manifest = _read_manifest(root)
    _check_files(root, manifest)
    log = _read_pass_log(root / manifest["pass_log"])
    if log is None:
        raise ArtifactError(f"{root}: the artifact was saved without a pass log")
    return log


def _read_pass_log(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if data is None:
        return None
    from transfuse.passes.log import PassLog

    try:
        return PassLog.from_json(data)
    except (TransfuseError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path}: malformed pass log: {e!r}") from None


__all__ = ["save", "read", "read_pass_log", "manifest_digest", "ArtifactContents", "FORMAT_NAME",
           "FORMAT_VERSION", "MANIFEST", "FILES"]

"""Build a TensorRT engine from the files next to this script (written by transfuse).

    python build_engine.py [--workspace-gb 4] [--version-compatible] [--output model.engine]

Reads model.onnx and profiles.json from this script's directory, parses the ONNX with
TensorRT's OnnxParser into a strongly typed network (every tensor's type comes from the ONNX:
no FP16/INT8 builder flags), adds one optimization profile per entry of profiles.json, builds a
serialized engine and writes it to model.engine, plus model.engine.json saying how it was
built. Needs only the ``tensorrt`` Python package (>= 10) and a GPU; transfuse is not needed.

transfuse ships this file as ``transfuse/codegen/tensorrt/build_template.py`` and copies it
unchanged into every export; ``transfuse.codegen.tensorrt.engine`` imports it to build engines
in-process, so there is one build procedure.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINE_FILE = "model.engine"
ENGINE_INFO_FILE = "model.engine.json"


def make_logger(trt, verbose=False):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def build_serialized(trt, onnx_path, profiles, *, workspace_bytes=None,
                     version_compatible=False, logger=None):
    """The serialized engine (bytes) of the ONNX file ``onnx_path`` with the optimization
    ``profiles`` (the profiles.json document). Raises RuntimeError with the parser's errors."""
    logger = logger or make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 11: always strongly typed, the flag is ignored
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  "
                           + "\n  ".join(errors or ["(no error recorded)"]))
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for i, entry in enumerate(profiles["profiles"]):
        profile = builder.create_optimization_profile()
        for name, shapes in entry["inputs"].items():
            if name not in network_inputs:
                continue  # an input the ONNX does not read (TensorRT drops unused inputs)
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        if config.add_optimization_profile(profile) < 0:
            raise RuntimeError(f"TensorRT rejected optimization profile {i}: {entry['inputs']}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    return bytes(plan)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", default=str(HERE / "model.onnx"))
    ap.add_argument("--profiles", default=str(HERE / "profiles.json"))
    ap.add_argument("--output", default=str(HERE / ENGINE_FILE))
    ap.add_argument("--workspace-gb", type=float, default=None,
                    help="limit on TensorRT's scratch memory while building (GiB)")
    ap.add_argument("--version-compatible", action="store_true",
                    help="build an engine later TensorRT versions can run "
                         "(BuilderFlag.VERSION_COMPATIBLE)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    try:
        import tensorrt as trt
    except ImportError as e:
        print(f"build_engine.py needs the tensorrt package (>= 10): {e}", file=sys.stderr)
        return 2
    profiles = json.loads(Path(args.profiles).read_text(encoding="utf-8"))
    workspace = int(args.workspace_gb * (1 << 30)) if args.workspace_gb else None
    t0 = time.perf_counter()
    try:
        plan = build_serialized(trt, args.onnx, profiles, workspace_bytes=workspace,
                                version_compatible=args.version_compatible,
                                logger=make_logger(trt, args.verbose))
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    out = Path(args.output)
    out.write_bytes(plan)
    info = {"tensorrt_version": trt.__version__, "version_compatible": args.version_compatible,
            "workspace_bytes": workspace, "build_seconds": round(seconds, 3),
            "onnx": Path(args.onnx).name, "profiles": len(profiles["profiles"])}
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=1) + "\n",
                                                 encoding="utf-8")
    print(f"wrote {out} ({len(plan) / 1e6:.1f} MB) with TensorRT {trt.__version__} "
          f"in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

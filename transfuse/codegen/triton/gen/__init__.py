"""Generated Triton kernels for fusion groups of the IR (issue 14).

The flow, for a host-code generator::

    part = partition(graph)                 # Partition: groups, reasons, schedule()
    for unit in part.schedule():            # groups and leftover nodes, dependency order
        if isinstance(unit, Group):
            k = emit_group(unit)            # GeneratedKernel: name, source, arguments
            outs = run(k, [buffers[v] for v in unit.inputs], env=symbols)
            buffers.update(zip(unit.outputs, outs))
        else:
            ...                             # the host runs the node (linear, attention, views)

- :mod:`.partition`: which nodes fuse (pointwise chains, last-dim reductions and norms with
  their prologues and epilogues), the legality checks (no cycle; shapes: :mod:`.space`) and
  the cost model (bytes saved), with a reason for every node left out;
- :mod:`.ops`: the Triton expression of each pointwise op, the reductions, the literals;
- :mod:`.emit`: the kernel source of a group (1-D blocked pointwise or row kernel);
- :mod:`.cache`: kernel files by source hash, imported once per process;
- :mod:`.launch`: :func:`run` (checks, symbols, launch configuration) and ``compile_spec``
  for the GPU compile check.
"""

from transfuse.codegen.triton import env  # noqa: F401  (first: fixes the interpreter mode)
from transfuse.codegen.triton.gen.emit import GeneratedKernel, emit_group
from transfuse.codegen.triton.gen.launch import bind, compile_spec, launch_config, run
from transfuse.codegen.triton.gen.partition import Group, Partition, fusion_groups, partition
from transfuse.codegen.triton.gen.space import GroupSpace

__all__ = ["partition", "fusion_groups", "Partition", "Group", "GroupSpace", "emit_group",
           "GeneratedKernel", "run", "bind", "launch_config", "compile_spec"]

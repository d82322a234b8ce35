"""Multi-device inference with JAX's SPMD partitioner: meshes, rule tables, multi-process start-up.

    from mmjax.sharding import make_mesh
    model = mmjax.load(folder, mesh=make_mesh("data:2,model:4"))   # or mesh="data:2,model:4"
    model = mmjax.load(folder, mesh="model:8", mm_encoder_tp_mode="data")  # vision tower data parallel

See docs/sharding.md for the rule tables and how to run on several hosts.
"""
from mmjax.sharding.mesh import initialize_distributed, make_mesh, parse_mesh_spec
from mmjax.sharding.rules import (AXIS_RULES, CACHE_AXES, ENCODER_MODES, INDIVISIBLE_REPLICATED, Fallback,
                                  ShardingError, batch_sharding, encoder_input_sharding, logical_to_spec,
                                  param_shardings, param_specs, shard_batch, shard_params, state_shardings, to_host)

__all__ = ["make_mesh", "parse_mesh_spec", "initialize_distributed", "AXIS_RULES", "CACHE_AXES", "ENCODER_MODES",
           "INDIVISIBLE_REPLICATED", "Fallback", "ShardingError", "logical_to_spec", "param_specs", "param_shardings",
           "shard_params", "batch_sharding", "shard_batch", "encoder_input_sharding", "state_shardings", "to_host"]

"""Demo models: unfused MoE layers as people write them, for the fusion passes to rewrite."""

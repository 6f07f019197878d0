"""imgclf stages: one plain function per stage, of (typed params, input paths) -> output paths."""

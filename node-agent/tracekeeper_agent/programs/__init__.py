"""What a probe compiles to: the builder, the C prelude and one module per probe kind."""

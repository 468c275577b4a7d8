"""World-model-only tools: metrics of generated frames and videos against recorded ones."""

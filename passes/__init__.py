"""Graph passes (imported as ``fxq.passes``): analysis passes write ``node.meta``, transform passes rewrite."""

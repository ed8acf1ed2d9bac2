"""The fast paths behind moge.experts: the fused expert products and the CPU precision rules."""

"""The shop: Shoal's reference application (see examples/shop/README.md)."""

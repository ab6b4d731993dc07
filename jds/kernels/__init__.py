"""Kernels: each op has a plain-jnp reference beside its fast paths and a dispatcher."""

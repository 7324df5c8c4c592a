"""C sources and cffi bindings for the vm_event ABI (installed as policyc.native)."""

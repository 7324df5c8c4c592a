"""C sources and cffi bindings for the vm_event ABI (installed as policyc.native).

Stage: the ABI itself (vm_event requests, responses, the ring) and the native decision engine, in C.
May import: policyc.errors alone; every other stage may import it.
"""

"""The HTTP services a stage runs beside it (the retriever, SGLang), one module per concern.

    specs.py        ServiceSpec, retriever_service, sglang_service, what a child inherits, ServiceError
    ports.py        who holds a port, pid files, servers of ours an earlier run left behind
    supervisor.py   Supervisor: start, health-gate, log and stop them; wait_for_health for external ones

Import each name from the module that defines it; this package re-exports nothing.
"""

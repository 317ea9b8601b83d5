"""Orchestration, the only one: what to run (``spec``), the jobs it means (``plan``), running them and
storing each as it finishes (``driver``, ``executors``, ``compute``), and publishing (``annotate``,
``publish``). ``commands`` holds the library calls behind the CLI. Only ``quantlab.cli`` and ``scripts/``
import this package.
"""

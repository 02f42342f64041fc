"""
Test support, importable by users' own tests: the control-plane simulator
(``plexagent.testing.simulator``) and fixtures.
"""

from plexagent.testing.simulator import ControlPlaneSimulator, Faults, NodeRecord, example_record

__all__ = ["ControlPlaneSimulator", "Faults", "NodeRecord", "example_record"]

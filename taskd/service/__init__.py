"""What each control method does, one class per concern, and the dispatch table that maps
each declared method (taskd.protocol.METHODS) to its one handler."""

from taskd.service.dispatch import Binding, Dispatch, bind
from taskd.service.jobs import JobMethods
from taskd.service.node import NodeMethods, Reloadable, retention_ages
from taskd.service.schedules import ScheduleMethods
from taskd.service.status import DaemonInfo, Node, SlotState, StatusMethods

__all__ = [
    "Binding",
    "DaemonInfo",
    "Dispatch",
    "JobMethods",
    "Node",
    "NodeMethods",
    "Reloadable",
    "ScheduleMethods",
    "SlotState",
    "StatusMethods",
    "bind",
    "retention_ages",
]

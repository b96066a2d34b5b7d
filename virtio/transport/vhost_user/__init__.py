"""vhost-user: serve virtio devices to a front-end (QEMU) over a Unix socket.

Layout (one job per module):

- ``messages``  wire format: header, request enums, payload dataclasses, the request table;
- ``protocol``  sans-IO ``BackendConnection``: bytes + fds in, events out, replies built;
- ``errors``    the front-end's protocol violations (``DriverError`` subclasses).

The spec is QEMU's ``docs/interop/vhost-user.rst``.
"""

from .errors import IncorrectFds as IncorrectFds
from .errors import InvalidMessage as InvalidMessage
from .errors import OversizedMessage as OversizedMessage
from .errors import PartialMessage as PartialMessage
from .errors import PayloadSizeMismatch as PayloadSizeMismatch
from .errors import ProtocolFeatureNotNegotiated as ProtocolFeatureNotNegotiated
from .errors import UnknownRequest as UnknownRequest
from .errors import VhostUserProtocolError as VhostUserProtocolError
from .messages import MAX_PAYLOAD_SIZE as MAX_PAYLOAD_SIZE
from .messages import BackendRequest as BackendRequest
from .messages import FrontendRequest as FrontendRequest
from .messages import ProtocolFeature as ProtocolFeature
from .protocol import NEED_DATA as NEED_DATA
from .protocol import BackendConnection as BackendConnection
from .protocol import ConnectionClosed as ConnectionClosed
from .protocol import ConnectionState as ConnectionState
from .protocol import Outgoing as Outgoing
from .protocol import RejectedRequest as RejectedRequest
from .protocol import Reply as Reply
from .protocol import Request as Request

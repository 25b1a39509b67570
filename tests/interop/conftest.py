"""Each real server once per module, and a gateway in front of the one the module
names in MTA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.interop.helpers import gateway
from tests.support.mta import DovecotLmtp, Exim, Postfix
from tests.support.procs import Gateway


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postfix]:
    with Postfix(tmp_path_factory.mktemp("postfix"), blocked_clients=("127.0.0.3",)) as pf:
        yield pf


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotLmtp]:
    with DovecotLmtp(tmp_path_factory.mktemp("dovecot")) as dc:
        yield dc


@pytest.fixture(scope="module")
def exim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exim]:
    with Exim(tmp_path_factory.mktemp("exim")) as ex:
        yield ex


@pytest.fixture(scope="module")
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    mta = request.getfixturevalue(request.module.MTA)
    with gateway(mta.url, tmp_path_factory.mktemp("gw")) as g:
        yield g

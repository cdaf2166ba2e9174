"""The panel's Backend section: local (PyTorch, device) or remote (server URL, token, the
connection test), and what keeps the chosen backend from running."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from LongitudinalDiffusionLib.errors import LongitudinalDiffusionError

from .panelkit import _

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchInfo:
    """What the PyTorch in this Python can use."""

    version: str
    cudaVersion: str | None
    cudaAvailable: bool
    devices: tuple[str, ...] = ()
    mpsAvailable: bool = False


def probeTorch() -> TorchInfo | None:
    """The installed PyTorch and its GPUs; None when PyTorch is not installed.

    Imports torch (about a second the first time). Raises whatever a broken install raises.
    """
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    cuda = bool(torch.cuda.is_available())
    devices = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ()
    mps = getattr(torch.backends, "mps", None)
    return TorchInfo(
        version=str(torch.__version__),
        cudaVersion=torch.version.cuda,
        cudaAvailable=cuda,
        devices=devices,
        mpsAvailable=bool(mps is not None and mps.is_available()),
    )


class BackendSection:
    """The backend choice (a part of :class:`~.panel.Panel`).

    Uses the panel's ``ui``, ``_torchProbe``, ``_connectionTester``, the
    ``testConnectionRequested`` signal, ``currentModel``, ``updateApplyState``, ``setStatus``
    and ``appendLog``.
    """

    ui: Any
    _torchInfo: TorchInfo | None
    _torchChecked: bool

    def isRemote(self) -> bool:
        return bool(self.ui.remoteRadioButton.property("checked"))

    def device(self) -> str:
        return str(self.ui.deviceComboBox.property("currentText"))

    def serverUrl(self) -> str:
        return (self.ui.serverUrlLineEdit.property("text") or "").strip()

    def onBackendChanged(self, *_args: Any) -> None:
        """Remote fields only with the remote choice, the device only with the local one."""
        ui, remote = self.ui, self.isRemote()
        for widget in (ui.serverUrlLabel, ui.serverUrlLineEdit, ui.tokenLabel, ui.tokenLineEdit):
            widget.setEnabled(remote)
        ui.testConnectionButton.setEnabled(remote)
        for widget in (ui.deviceLabel, ui.deviceComboBox, ui.torchInfoLabel):
            widget.setEnabled(not remote)
        self.updateApplyState()

    def refreshBackendInfo(self) -> None:
        """Show the PyTorch version, whether CUDA works and the GPU names (imports torch)."""
        try:
            info = self._torchProbe()
        except Exception as exc:  # a broken install raises anything (ImportError, OSError, ...): shown, and logged
            logger.exception("PyTorch could not be loaded")
            info = None
            text = _("PyTorch is installed but cannot be loaded: {error}").format(error=exc)
        else:
            if info is None:
                text = _("PyTorch is not installed yet (it is installed on first use, after you agree).")
            elif info.cudaAvailable:
                names = "; ".join(f"cuda:{i} {name}" for i, name in enumerate(info.devices))
                text = _("PyTorch {version} with CUDA {cuda}: {names}").format(
                    version=info.version, cuda=info.cudaVersion, names=names or _("a GPU")
                )
            elif info.cudaVersion is None:
                text = _("PyTorch {version}, a CPU-only build: no CUDA GPU will be used.").format(version=info.version)
            else:
                text = _(
                    "PyTorch {version} (built for CUDA {cuda}) finds no usable GPU: check the NVIDIA driver. "
                    "Runs use the CPU."
                ).format(version=info.version, cuda=info.cudaVersion)
            if info is not None and info.mpsAvailable:
                text += " " + _("Apple GPU (MPS) available.")
        self._torchInfo = info
        self._torchChecked = True
        self.ui.torchInfoLabel.setText(text)
        self.updateApplyState()

    def torchInfo(self) -> TorchInfo | None:
        """What :meth:`refreshBackendInfo` found (None before, or when torch is missing)."""
        return self._torchInfo

    def _urlProblem(self) -> str:
        url = self.serverUrl()
        if not url:
            return _("Enter the server URL (Backend section), e.g. https://server:8000.")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return _(
                "The server URL must start with https:// (or http://) and name a server: '{url}' does not."
            ).format(url=url)
        return ""

    def _backendProblem(self) -> str:
        if self.isRemote():
            return self._urlProblem()
        info = self._torchInfo
        if self.device() == "cuda" and self._torchChecked and info is not None and not info.cudaAvailable:
            return _(
                "The device is cuda, but PyTorch {version} sees no CUDA GPU: choose auto or cpu "
                "(or install a CUDA build of PyTorch)."
            ).format(version=info.version)
        return ""

    def onTestConnection(self, *_args: Any) -> None:
        problem = self._urlProblem()
        if problem:
            self.setStatus(problem)
            return
        url, token = self.serverUrl(), self.ui.tokenLineEdit.property("text") or ""
        if self._connectionTester is None:
            if not self.testConnectionRequested.isConnected():
                self.setStatus(_("Remote servers are not supported in this version yet."))
                return
            self.testConnectionRequested.emit(url, token)
            return
        self.setStatus(_("Connecting to {url}...").format(url=url))
        try:
            card = self.currentModel()
            summary = self._connectionTester(url, token, card.name if card is not None else None)
        except (LongitudinalDiffusionError, OSError) as exc:
            message = _("Connection failed: {error}").format(error=exc)
        else:
            message = _("Connection OK: {summary}").format(summary=summary)
        self.appendLog(message)
        self.setStatus(message)

    def _where(self) -> str:
        if self.isRemote():
            return _("on {host}").format(host=urlparse(self.serverUrl()).hostname)
        return _("on this computer ({device})").format(device=self.device())

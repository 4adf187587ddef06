"""An application object for tools that want one rather than a builder (`serve build`, `serve run
deployments.default_app:app`): the settings come from EMB_PROVIDER_* and .env alone."""

from deployments.app import build_app
from embserve.settings import Settings

app = build_app(Settings())

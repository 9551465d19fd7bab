from node.app import create_app
from node.config import load_config

app = create_app(load_config())

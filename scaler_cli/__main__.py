from scaler_cli.app import entry

entry()

"""Importers: other tools' training configs -> commented meshbake recipes (text)."""

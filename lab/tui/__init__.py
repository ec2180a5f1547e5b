"""The lab console (Textual). Nothing outside this package imports textual."""

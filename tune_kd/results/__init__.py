"""Reading a results folder: the report, sample answers, the control arms' verdicts, the front, export (imports
config .. train)."""

"""The built-in tasks, one module each. Every module here is imported when tasks are looked up
(genfarm.spec.discover_tasks), and defining its `Task` subclass registers it: adding a task is adding a module."""

"""The writing side of the lake: `kafka` (the local broker and producers), `jvm` (the jars the JVM parts need),
`stream` (the Spark job that fills the lake) and `ops` (audit, doctor, replay)."""

// Prints robfig/cron v3's answer for every row of a table of
// (id, spec, start, start zone): cron.ParseStandard(spec).Next(start), as Velero computes a
// Schedule's next run (pkg/controller/schedule_controller.go). Reads the rows of
// tests/fixtures/robfig-cron-v3.0.1-next.tsv on stdin (comments are copied) and writes
// them back with robfig's answer in the last column: UTC RFC 3339, ZERO (no next run
// within robfig's five years) or ERR (the spec does not parse). Run with TZ=UTC.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"time"

	cron "github.com/robfig/cron/v3"
)

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		line := in.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			fmt.Fprintln(out, line)
			continue
		}
		c := strings.Split(line, "\t")
		id, spec, startText, zone := c[0], c[1], c[2], c[3]
		start, err := time.Parse(time.RFC3339Nano, startText)
		if err != nil {
			panic(fmt.Sprintf("%s: %v", id, err))
		}
		if zone != "-" {
			loc, err := time.LoadLocation(zone)
			if err != nil {
				panic(fmt.Sprintf("%s: %v", id, err))
			}
			start = start.In(loc)
		}
		answer := "ERR"
		if schedule, err := cron.ParseStandard(spec); err == nil {
			if next := schedule.Next(start); next.IsZero() {
				answer = "ZERO"
			} else {
				answer = next.UTC().Format(time.RFC3339)
			}
		}
		fmt.Fprintf(out, "%s\t%s\t%s\t%s\t%s\n", id, spec, startText, zone, answer)
	}
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"time"
)

// runGoFlags parses command lines with Go's own flag package, so the pytest
// suite can check that derpd reads derper's command lines exactly as derper
// does. The cases file is JSON:
//
//	{"flags": [{"name": "a", "kind": "string"}, ...], "cases": [["-a", ":443"], ...]}
//
// kind is string, bool, int, float or duration (the types of derper's flags).
// For each case the result has either "error" or "set" (every flag the command
// line set, with its parsed value: durations in seconds, +Inf/-Inf as strings)
// and "rest" (the arguments after parsing stopped).
//
//	derpinterop goflags --cases FILE
func runGoFlags(ctx context.Context, args []string) (result, error) {
	fs := flag.NewFlagSet("goflags", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	casesFile := fs.String("cases", "", "JSON file of flags and command lines")
	if err := fs.Parse(args); err != nil {
		return nil, usageError{err}
	}
	if *casesFile == "" || fs.NArg() != 0 {
		return nil, usageError{errors.New("--cases is required (and nothing else)")}
	}
	raw, err := os.ReadFile(*casesFile)
	if err != nil {
		return nil, err
	}
	var spec struct {
		Flags []struct{ Name, Kind string }
		Cases [][]string
	}
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, usageError{err}
	}
	var results []result
	for _, argv := range spec.Cases {
		set := flag.NewFlagSet("derper", flag.ContinueOnError)
		set.SetOutput(io.Discard)
		for _, f := range spec.Flags {
			switch f.Kind {
			case "string":
				set.String(f.Name, "", "")
			case "bool":
				set.Bool(f.Name, false, "")
			case "int":
				set.Int(f.Name, 0, "")
			case "float":
				set.Float64(f.Name, 0, "")
			case "duration":
				set.Duration(f.Name, 0, "")
			default:
				return nil, usageError{fmt.Errorf("unknown kind %q", f.Kind)}
			}
		}
		if err := set.Parse(argv); err != nil {
			results = append(results, result{"error": err.Error()})
			continue
		}
		values := result{}
		set.Visit(func(f *flag.Flag) {
			v := f.Value.(flag.Getter).Get()
			switch x := v.(type) {
			case time.Duration:
				values[f.Name] = x.Seconds()
			case float64:
				if math.IsInf(x, 0) {
					values[f.Name] = fmt.Sprint(x)
				} else {
					values[f.Name] = x
				}
			default:
				values[f.Name] = x
			}
		})
		results = append(results, result{"set": values, "rest": append([]string{}, set.Args()...)})
	}
	return result{"results": results}, nil
}

// Command opamp-protodump prints a canonical, sorted description of the OpAMP
// protobuf schema compiled into opamp-go (the reference implementation), one
// line per item. With -compare FILE it instead checks a serialized
// google.protobuf.FileDescriptorSet (binary) of our own protos against it.
//
// Line format (KEY VALUE, the key identifies the item, the value its shape):
//
//	file <path> package <pkg>
//	file <path> syntax <syntax>
//	file <path> import <dep>
//	message <full.Name> file <path> [map_entry]
//	message <full.Name> oneof <name>
//	message <full.Name> reserved <lo>-<hi> | reserved_name <name>
//	message <full.Name> field <num> <name> <kind> [<type_name>] <label> [oneof <name>] [proto3_optional] [packed]
//	enum <full.Name> file <path>
//	enum <full.Name> value 0x<num> <name>
//
// Exit status in -compare mode: 0 when every reference line is present
// unchanged in ours (extra items of ours are reported as "extra:" but are not a
// failure), 1 on any missing/different item, 2 on usage or input errors.
package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/open-telemetry/opamp-go/protobufs"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

type item struct{ key, val string }

func (i item) String() string {
	if i.val == "" {
		return i.key
	}
	return i.key + " " + i.val
}

func dumpFile(fd protoreflect.FileDescriptor) []item {
	path := fd.Path()
	out := []item{
		{"file " + path + " package", string(fd.Package())},
		{"file " + path + " syntax", fd.Syntax().String()},
	}
	imps := fd.Imports()
	for i := 0; i < imps.Len(); i++ {
		out = append(out, item{"file " + path + " import " + imps.Get(i).Path(), ""})
	}
	out = append(out, dumpEnums(path, fd.Enums())...)
	out = append(out, dumpMessages(path, fd.Messages())...)
	return out
}

func dumpEnums(path string, enums protoreflect.EnumDescriptors) []item {
	var out []item
	for i := 0; i < enums.Len(); i++ {
		e := enums.Get(i)
		name := "enum " + string(e.FullName())
		out = append(out, item{name, "file " + path})
		vals := e.Values()
		for j := 0; j < vals.Len(); j++ {
			v := vals.Get(j)
			out = append(out, item{fmt.Sprintf("%s value 0x%08x", name, uint32(v.Number())), string(v.Name())})
		}
		rr := e.ReservedRanges()
		for j := 0; j < rr.Len(); j++ {
			r := rr.Get(j)
			out = append(out, item{fmt.Sprintf("%s reserved %d-%d", name, r[0], r[1]), ""})
		}
		rn := e.ReservedNames()
		for j := 0; j < rn.Len(); j++ {
			out = append(out, item{name + " reserved_name " + string(rn.Get(j)), ""})
		}
	}
	return out
}

func dumpMessages(path string, msgs protoreflect.MessageDescriptors) []item {
	var out []item
	for i := 0; i < msgs.Len(); i++ {
		m := msgs.Get(i)
		name := "message " + string(m.FullName())
		hdr := "file " + path
		if m.IsMapEntry() {
			hdr += " map_entry"
		}
		out = append(out, item{name, hdr})
		oneofs := m.Oneofs()
		for j := 0; j < oneofs.Len(); j++ {
			o := oneofs.Get(j)
			if o.IsSynthetic() {
				continue // proto3 optional; shown on the field itself
			}
			out = append(out, item{name + " oneof " + string(o.Name()), ""})
		}
		rr := m.ReservedRanges()
		for j := 0; j < rr.Len(); j++ {
			r := rr.Get(j)
			// Ranges are half-open in descriptors; print them inclusive.
			out = append(out, item{fmt.Sprintf("%s reserved %d-%d", name, r[0], r[1]-1), ""})
		}
		rn := m.ReservedNames()
		for j := 0; j < rn.Len(); j++ {
			out = append(out, item{name + " reserved_name " + string(rn.Get(j)), ""})
		}
		fields := m.Fields()
		for j := 0; j < fields.Len(); j++ {
			f := fields.Get(j)
			var b strings.Builder
			b.WriteString(string(f.Name()))
			b.WriteString(" ")
			b.WriteString(f.Kind().String())
			switch f.Kind() {
			case protoreflect.MessageKind, protoreflect.GroupKind:
				b.WriteString(" " + string(f.Message().FullName()))
			case protoreflect.EnumKind:
				b.WriteString(" " + string(f.Enum().FullName()))
			}
			b.WriteString(" " + f.Cardinality().String())
			if o := f.ContainingOneof(); o != nil && !o.IsSynthetic() {
				b.WriteString(" oneof " + string(o.Name()))
			}
			if f.HasOptionalKeyword() {
				b.WriteString(" proto3_optional")
			}
			if f.IsPacked() {
				b.WriteString(" packed")
			}
			out = append(out, item{fmt.Sprintf("%s field %d", name, f.Number()), b.String()})
		}
		out = append(out, dumpEnums(path, m.Enums())...)
		out = append(out, dumpMessages(path, m.Messages())...)
	}
	return out
}

func sorted(items []item) []item {
	sort.Slice(items, func(a, b int) bool { return items[a].String() < items[b].String() })
	return items
}

func reference() []item {
	var items []item
	for _, fd := range []protoreflect.FileDescriptor{protobufs.File_anyvalue_proto, protobufs.File_opamp_proto} {
		items = append(items, dumpFile(fd)...)
	}
	return sorted(items)
}

// ours loads a binary FileDescriptorSet and dumps the files with the same
// paths as opamp-go's (anyvalue.proto, opamp.proto).
func ours(path string) ([]item, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(raw, &set); err != nil {
		return nil, fmt.Errorf("parse %s as FileDescriptorSet: %w", path, err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		return nil, fmt.Errorf("build descriptors from %s: %w", path, err)
	}
	var items []item
	for _, ref := range []protoreflect.FileDescriptor{protobufs.File_anyvalue_proto, protobufs.File_opamp_proto} {
		fd, err := files.FindFileByPath(ref.Path())
		if err == protoregistry.NotFound {
			return nil, fmt.Errorf("%s does not contain a file named %q", path, ref.Path())
		} else if err != nil {
			return nil, err
		}
		items = append(items, dumpFile(fd)...)
	}
	return sorted(items), nil
}

func compare(ref, got []item) (mismatches int) {
	gotByKey := map[string]string{}
	for _, it := range got {
		gotByKey[it.key] = it.val
	}
	refByKey := map[string]string{}
	for _, it := range ref {
		refByKey[it.key] = it.val
		v, ok := gotByKey[it.key]
		switch {
		case !ok:
			fmt.Printf("missing: %s\n", it)
			mismatches++
		case v != it.val:
			fmt.Printf("differs: %s (ours: %s)\n", it, item{it.key, v})
			mismatches++
		}
	}
	extras := 0
	for _, it := range got {
		if _, ok := refByKey[it.key]; !ok {
			fmt.Printf("extra: %s\n", it)
			extras++
		}
	}
	fmt.Fprintf(os.Stderr, "opamp-protodump: %d reference items, %d ours, %d mismatches, %d extra\n",
		len(ref), len(got), mismatches, extras)
	return mismatches
}

func main() {
	cmp := flag.String("compare", "", "binary google.protobuf.FileDescriptorSet of our protos to check against opamp-go")
	flag.Parse()
	if flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: opamp-protodump [-compare FILE]")
		os.Exit(2)
	}
	ref := reference()
	if *cmp == "" {
		for _, it := range ref {
			fmt.Println(it)
		}
		return
	}
	got, err := ours(*cmp)
	if err != nil {
		fmt.Fprintln(os.Stderr, "opamp-protodump:", err)
		os.Exit(2)
	}
	if compare(ref, got) > 0 {
		os.Exit(1)
	}
}
